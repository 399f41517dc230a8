"""Converted SD3 pipeline folders of configs only (no weights: the planner reads none), for
compiling SD3.5 Medium's programs at a reduced depth or width: tools/sd35m_configs.py's."""
import importlib.util
import pathlib

_TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "sd35m_configs.py"
_spec = importlib.util.spec_from_file_location("sd35m_configs", _TOOL)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)


def sd35m_folder(folder, num_layers: int, overrides: dict | None = None) -> str:
    """SD3.5 Medium's configs with the MMDiT cut to its first `num_layers - 1` layers plus the
    context_pre_only last one, and `overrides` ({component: {key: value}}) applied on top."""
    return _tool.write_folder(folder, num_layers, overrides)
