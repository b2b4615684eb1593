"""Stage 1, data: where rows come from (``sources``), their formats mapped to one chat form
(``formats``), chat-template rendering with the loss mask (``template``), and validation, the
seeded eval split and tokenisation (``prepare``)."""
