"""Codecs turn messages into bytes and back.

- :class:`JSON` (the default) uses the standard library's :mod:`json`.
- :class:`MsgPack` uses `msgpack <https://msgpack.org>`_ (``pip install
  'aiomas[mp]'``).
- :class:`MsgPackBlosc` compresses MsgPack's output with Blosc (``pip install
  'aiomas[mpb]'``).

Every codec can learn new types with :meth:`Codec.add_serializer`.  An object of
such a type travels as the map ``{"__type__": [type_id, data]}`` where ``type_id``
is the 0-based position of its serializer in the order they were added to the
codec, so both peers must add the same serializers in the same order.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, Final, TypeVar, overload

from aiomas.exceptions import SerializationError

__all__ = ["JSON", "Codec", "MsgPack", "MsgPackBlosc", "serializable"]

T = TypeVar("T", bound=type)

Serializer = Callable[[Any], Any]
Deserializer = Callable[[Any], Any]

_TYPE_KEY: Final = "__type__"

# Errors that encoders raise for values they cannot encode.
_ENCODE_ERRORS: Final = (TypeError, ValueError, OverflowError, RecursionError)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Codec:
    """Base class for all codecs.

    Subclasses implement :meth:`encode` and :meth:`decode` and call
    :meth:`serialize_obj` for objects their format cannot represent (e.g. as the
    ``default`` hook of the encoder) and :meth:`deserialize_obj` for every decoded
    map.
    """

    def __init__(self) -> None:
        self._serializers: dict[type, tuple[int, Serializer]] = {}
        self._deserializers: list[Deserializer] = []

    def __repr__(self) -> str:
        types = ", ".join(t.__qualname__ for t in self._serializers)
        return f"<{type(self).__name__} codec ({types or 'no extra types'})>"

    def encode(self, data: Any) -> bytes:
        """Encode *data* and return the bytes.

        Raises:
            SerializationError: if *data* (or something in it) cannot be encoded.
        """
        raise NotImplementedError

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode *data* to the original data structure.

        Raises:
            SerializationError: if *data* cannot be decoded.
        """
        raise NotImplementedError

    def add_serializer(
        self, type: type, serialize: Serializer, deserialize: Deserializer
    ) -> None:
        """Teach the codec to encode objects of exactly *type* (not subclasses).

        *serialize* gets an object and returns something the codec can encode;
        *deserialize* gets that and returns an equivalent object.  A serializer
        for :class:`object` is the fall-back for objects of any other type.

        Raises:
            ValueError: if *type* already has a serializer.
        """
        if type in self._serializers:
            raise ValueError(
                f'There is already a serializer for type "{_type_name(type)}"'
            )
        type_id = len(self._deserializers)
        self._serializers[type] = (type_id, serialize)
        self._deserializers.append(deserialize)

    def serialize_obj(self, obj: Any) -> dict[str, Any]:
        """Return ``{"__type__": [type_id, serialize(obj)]}`` for *obj*.

        Raises:
            SerializationError: if there is no serializer for the type of *obj*
                (and none for :class:`object`), or the serializer fails.
        """
        entry = self._serializers.get(type(obj))
        if entry is None:
            entry = self._serializers.get(object)
            if entry is None:
                raise SerializationError(
                    f'No serializer found for type "{_type_name(type(obj))}"; '
                    "add one with Codec.add_serializer() (or extra_serializers)"
                )
        type_id, serialize = entry
        try:
            data = serialize(obj)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f'Serializing a "{_type_name(type(obj))}" failed: {exc!r}'
            ) from exc
        return {_TYPE_KEY: [type_id, data]}

    def deserialize_obj(self, obj_repr: dict[Any, Any]) -> Any:
        """Return the object that *obj_repr* stands for.

        A map ``{"__type__": [type_id, data]}`` becomes ``deserialize(data)`` of
        the serializer with that id; any other map is returned unchanged.

        Raises:
            SerializationError: for an unknown type id or a failing deserializer.
        """
        if len(obj_repr) != 1 or _TYPE_KEY not in obj_repr:
            return obj_repr
        value = obj_repr[_TYPE_KEY]
        if type(value) not in (list, tuple) or len(value) != 2:
            return obj_repr
        type_id, data = value
        if type(type_id) is not int:
            return obj_repr
        if not 0 <= type_id < len(self._deserializers):
            raise SerializationError(f"Unknown type id {type_id} in {_TYPE_KEY!r} map")
        try:
            return self._deserializers[type_id](data)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"Deserializing type id {type_id} failed: {exc!r}"
            ) from exc


class JSON(Codec):
    """A :class:`Codec` that uses JSON.

    The output is ``json.dumps(data).encode()`` (with the default separators, so
    ``['spam', 3.14]`` becomes ``b'["spam", 3.14]'``).  Lists and tuples both
    decode to lists.
    """

    def __init__(self) -> None:
        super().__init__()
        # One encoder and decoder per codec: json.dumps()/loads() with arguments
        # would build new ones for every message.
        self._encoder = json.JSONEncoder(default=self.serialize_obj)
        self._decoder = json.JSONDecoder(object_hook=self.deserialize_obj)

    def encode(self, data: Any) -> bytes:
        try:
            return self._encoder.encode(data).encode()
        except SerializationError:
            raise
        except _ENCODE_ERRORS as exc:
            raise SerializationError(
                f"Cannot encode {_abbreviate(data)}: {exc}"
            ) from exc

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return self._decoder.decode(str(data, "utf-8"))
        except SerializationError:
            raise
        except (ValueError, TypeError, RecursionError) as exc:
            raise SerializationError(f"Cannot decode JSON: {exc}") from exc


class MsgPack(Codec):
    """A :class:`Codec` that uses msgpack.

    Supports :class:`bytes`; arrays decode to tuples.  Needs the ``msgpack``
    package (``pip install 'aiomas[mp]'``).

    Raises:
        ImportError: on creation, if msgpack is not installed.
    """

    def __init__(self) -> None:
        super().__init__()
        try:
            import msgpack
        except ImportError as exc:
            raise ImportError(
                "The MsgPack codec needs the 'msgpack' package: "
                "pip install 'aiomas[mp]'"
            ) from exc
        self._msgpack = msgpack
        self._packer = msgpack.Packer(default=self.serialize_obj, use_bin_type=True)
        self._unpack_errors = (
            msgpack.UnpackException,
            ValueError,
            TypeError,
            RecursionError,
        )

    def encode(self, data: Any) -> bytes:
        try:
            packed: bytes = self._packer.pack(data)
        except SerializationError:
            self._packer.reset()
            raise
        except _ENCODE_ERRORS as exc:
            self._packer.reset()
            raise SerializationError(
                f"Cannot encode {_abbreviate(data)}: {exc}"
            ) from exc
        return packed

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return self._msgpack.unpackb(
                data,
                raw=False,
                use_list=False,
                strict_map_key=False,
                object_hook=self.deserialize_obj,
            )
        except SerializationError:
            raise
        except self._unpack_errors as exc:
            raise SerializationError(f"Cannot decode MsgPack: {exc!r}") from exc


class MsgPackBlosc(MsgPack):
    """A :class:`Codec` that uses msgpack and compresses the result with Blosc.

    Needs the ``msgpack`` and ``blosc`` packages (``pip install 'aiomas[mpb]'``).

    Raises:
        ImportError: on creation, if msgpack or blosc is not installed.
    """

    max_decompressed_size: int = 256 * 2**20
    """Received data that would decompress to more bytes than this is refused, so
    that a small message cannot make us allocate huge amounts of memory."""

    def __init__(self) -> None:
        super().__init__()
        try:
            import blosc
        except ImportError as exc:
            raise ImportError(
                "The MsgPackBlosc codec needs the 'blosc' package: "
                "pip install 'aiomas[mpb]'"
            ) from exc
        self._blosc = blosc

    def encode(self, data: Any) -> bytes:
        packed = super().encode(data)
        if len(packed) > self._blosc.MAX_BUFFERSIZE:
            raise SerializationError(
                f"Message of {len(packed)} bytes is too large for Blosc "
                f"(at most {self._blosc.MAX_BUFFERSIZE} bytes)"
            )
        compressed: bytes = self._blosc.compress(packed, typesize=8)
        return compressed

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        view = memoryview(data)
        # A Blosc chunk starts with a 16-byte header; bytes 4-7 hold the size of
        # the decompressed data (little endian), bytes 12-15 the chunk size.
        if len(view) < 16:
            raise SerializationError("Cannot decode Blosc: data too short")
        nbytes = int.from_bytes(view[4:8], "little")
        cbytes = int.from_bytes(view[12:16], "little")
        if cbytes != len(view):
            raise SerializationError(
                f"Cannot decode Blosc: header says {cbytes} bytes, got {len(view)}"
            )
        if nbytes > self.max_decompressed_size:
            raise SerializationError(
                f"Refusing to decompress {nbytes} bytes "
                f"(max_decompressed_size is {self.max_decompressed_size})"
            )
        try:
            packed = self._blosc.decompress(bytes(view))
        except Exception as exc:
            raise SerializationError(f"Cannot decode Blosc: {exc!r}") from exc
        return super().decode(packed)


def _abbreviate(obj: Any, limit: int = 60) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@overload
def serializable(cls: T, *, repr: bool = True) -> T: ...


@overload
def serializable(cls: None = None, *, repr: bool = True) -> Callable[[T], T]: ...


def serializable(cls: T | None = None, *, repr: bool = True) -> T | Callable[[T], T]:
    """Class decorator that makes the decorated class serializable by a codec.

    The parameters of the class' ``__init__()`` must be available as attributes
    of the same name.  The decorator adds:

    - ``__asdict__()``: a dict with the values of all ``__init__`` parameters;
    - ``__fromdict__(attrs)`` (class method): a new instance made from such a dict;
    - ``__serializer__()`` (static method): the ``(type, serialize, deserialize)``
      tuple for :meth:`Codec.add_serializer`;
    - ``__repr__()`` like ``A(x=1, y=2)``, unless *repr* is false.

    Raises:
        TypeError: if ``__init__`` takes ``*args`` or ``**kwargs``.
    """

    def decorate(cls: T) -> T:
        params = list(inspect.signature(cls).parameters.values())
        for param in params:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(
                    f"@serializable cannot handle the parameter {param} of "
                    f"{cls.__qualname__}.__init__()"
                )
        names = tuple(param.name for param in params)

        def __asdict__(self: Any) -> dict[str, Any]:
            return {name: getattr(self, name) for name in names}

        def __fromdict__(klass: type, attrs: dict[str, Any]) -> Any:
            return klass(**attrs)

        def __serializer__() -> tuple[type, Serializer, Deserializer]:
            return cls, __asdict__, cls.__fromdict__  # type: ignore[attr-defined]

        def __repr__(self: Any) -> str:
            args = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
            return f"{type(self).__name__}({args})"

        cls.__asdict__ = __asdict__  # type: ignore[attr-defined]
        cls.__fromdict__ = classmethod(__fromdict__)  # type: ignore[attr-defined]
        cls.__serializer__ = staticmethod(__serializer__)  # type: ignore[attr-defined]
        if repr:
            cls.__repr__ = __repr__  # type: ignore[assignment]
        return cls

    if cls is None:
        return decorate
    return decorate(cls)
