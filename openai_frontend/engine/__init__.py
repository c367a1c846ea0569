"""What the frontend does, apart from HTTP: `Engine` (engine.py) holds one service per endpoint family (text,
images, adapters, models, tokenizers) over the Triton gateway, the model catalog and the supervisor; the routers
only parse, call one of them and shape the answer."""
