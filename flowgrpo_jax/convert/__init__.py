"""Weight conversion without torch: the key-table engine (`core`), safetensors reading and
writing (`safetensors_io`) and the converted component folder's format (`store`). Each net's
key table sits beside it in `models/`; `models/conversion.py` converts whole folders."""
