"""Where pickles find lstmopt's packed subclasses of users' nn.LSTM subclasses (``packed_subclass``).

A packed subclass is made at run time, so no module defines it by name. Its ``__qualname__``,
``Packed[<module>/<qualname>]`` (dots written as colons, which pickle does not split on), names the
user's class instead, and this module's ``__getattr__`` makes the packed class again from it when a pickle
asks for it: loading needs the user's class importable, as it would for the unpacked model.
"""

from importlib import import_module

from lstmopt.modules.lstm import packed_subclass

__all__: list = []


def __getattr__(name: str):
    if not (name.startswith("Packed[") and name.endswith("]") and "/" in name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, _, qualname = name[len("Packed["):-1].replace(":", ".").partition("/")
    base = import_module(module_name)
    for part in qualname.split("."):
        base = getattr(base, part)
    return packed_subclass(base)
