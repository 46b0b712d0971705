"""m2megatron: M2-Encoder bilingual image–text encoders on Megatron-Core."""

__version__ = "0.1.0"
