"""Model-side helpers: reading and tokenizing text, perplexity, preparing test models.

Nothing here knows about ranks or recipes; stages and the CLI compose these pieces.
"""
