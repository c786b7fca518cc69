"""Data readers (caption corpora, image folders), the built-in shapes data, transforms and tokenizers."""
