"""Nano VARGPT: a procedurally generated world of simple shapes, its evaluator and its tokenizer."""
