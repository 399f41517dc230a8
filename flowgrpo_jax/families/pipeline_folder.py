"""Reading a converted diffusers pipeline folder, for every family that loads one: its
model_index.json, its JSON configs and its tokenizers."""
import json
import os

# Tokenizer classes loaded by name from model_index.json; named classes (not AutoTokenizer,
# which imports torch) keep the library torch-free.
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def index_file(path: str) -> str:
    """The model_index.json of the converted pipeline folder `path`; FileNotFoundError in one
    line when the folder or the file is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{path}: not a converted pipeline folder (no model_index.json); "
                                f"convert a diffusers download with tools/convert_weights.py")
    return index_path


def read_index(path: str, required, what: str) -> dict:
    """{component: [library, class]} of the folder's model_index.json, the entries it holds,
    after checking that every name in `required` is one (`what` names the use in the error)."""
    index = {name: spec for name, spec in read_json(index_file(path)).items()
             if not name.startswith("_") and isinstance(spec, list) and spec[1] is not None}
    missing = [name for name in required if name not in index]
    if missing:
        raise ValueError(f"{path}: model_index.json lacks {missing}, needed for {what}")
    return index


def load_tokenizer(folder: str, class_name: str):
    import transformers  # only here: the rest of the library does not need it

    if class_name not in TOKENIZER_CLASSES:
        raise ValueError(f"{folder}: tokenizer class {class_name!r} not supported; "
                         f"expected one of {TOKENIZER_CLASSES}")
    return getattr(transformers, class_name).from_pretrained(folder)
