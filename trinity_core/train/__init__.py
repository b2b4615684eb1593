"""Stage 2, training: the OOM ladder (``ladder``) walks rungs of cheaper settings, each attempt
loads the model through a backend (``backends/``) and trains it with TRL (``trainer``); the
pre-flight memory estimate per rung (``memory``); fast DoRA (``fast_dora/``)."""
