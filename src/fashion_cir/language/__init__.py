"""Words for attributes: the lexicon, and reading a caption's requested changes."""
