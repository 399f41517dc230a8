"""The nets, in Flax NNX, each beside the key table that converts its PyTorch weights: the
MMDiT (`mmdit.py`, `mmdit_table.py`), the VAE, CLIP and T5 text encoders, and the attention
they share. Families build their generators from them; `components.py` names the convertible
ones by their PyTorch class, `conversion.py` converts downloaded folders, `abstract.py`
builds any of them as shapes only."""
