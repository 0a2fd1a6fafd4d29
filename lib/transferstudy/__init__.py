"""transferstudy: the thin shared library behind the AlexNet vs DeiT-Base transfer-learning book."""

__version__ = "0.1.0"
