"""Communication-restricted learning: codecs and faulty channels between stages.

A codec is a `Codec` subclass that registers itself by its `name` (codecs.py has the
built-in ones); every module of this package is imported here, so a codec in a file of
its own is found too.
"""

from ..registry import discover
from .channel import ACTIVATION, ERROR, Channel, ChannelSet
from .codecs import CODECS, Codec, Encoded, make_codec

discover(__name__, __path__)

__all__ = ["ACTIVATION", "ERROR", "CODECS", "Channel", "ChannelSet", "Codec", "Encoded",
           "make_codec"]
