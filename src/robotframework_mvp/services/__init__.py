"""Built-in services, each a plugin enabled by configuration and installed through an extra.

Each service uses only the hooks a third-party plugin would. List the one you want in
``RFMVP_PLUGINS`` (for example ``robotframework_mvp.services.ocr``), or pass an instance
to ``Orchestrator(plugins=[...])``.
"""
