"""Low-rank factorization (lesson 08): SVD, ASVD, SVD-LLM whitening, LoRC."""
