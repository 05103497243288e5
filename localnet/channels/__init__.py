"""Communication-restricted learning: codecs and faulty channels between stages."""

from .channel import ACTIVATION, ERROR, Channel, ChannelSet
from .codecs import CODECS, Encoded, Codec, make_codec

__all__ = ["ACTIVATION", "ERROR", "CODECS", "Channel", "ChannelSet", "Codec", "Encoded",
           "make_codec"]
