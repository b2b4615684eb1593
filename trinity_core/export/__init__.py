"""Stage 3, export: the host pre-flight (``resources``), the shard-streamed merge into the base
(``merge``, ``shards``), GGUF conversion and quantisation (``gguf``); ``run`` runs them in order."""
