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

A codec instance keeps state (its serializers, and buffers for speed), so every
connection gets its own instance, and one instance must not be used from several
threads at once.

Encoding fails with :class:`~aiomas.exceptions.SerializationError` when the caller
passes something the codec cannot represent; decoding fails with it when the bytes
are not a valid message.  No other exception escapes from bad input.
"""

from __future__ import annotations

import inspect
import json
import json.encoder
import reprlib
import struct
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, TypeAlias, TypeVar, cast, overload

from aiomas.exceptions import SerializationError

__all__ = ["JSON", "Codec", "MsgPack", "MsgPackBlosc", "serializable"]

_C = TypeVar("_C", bound=type)

Serializer: TypeAlias = Callable[[Any], Any]
"""Turns an object into something the codec can encode."""

Deserializer: TypeAlias = Callable[[Any], Any]
"""Turns what a :data:`Serializer` made back into an object."""

_TYPE_KEY: Final = "__type__"

# What encoders raise for values they cannot represent: unknown types (TypeError),
# circular references and int-to-text limits (ValueError), ints beyond 64 bits
# (OverflowError) and too deep nesting (RecursionError, or ValueError in msgpack).
_ENCODE_ERRORS: Final = (TypeError, ValueError, OverflowError, RecursionError)

# Error messages quote the message that failed.  It may be huge or deeply nested,
# so reprlib bounds both the work and the length of the quote.
_short_repr = reprlib.Repr()
_short_repr.maxlevel = 3
_short_repr.maxstring = 40
_short_repr.maxother = 40


def _quote(obj: Any) -> str:
    try:
        return _short_repr.repr(obj)
    except Exception:  # e.g. an int with more digits than repr() allows
        return f"<{type(obj).__qualname__} object>"


def _type_name(cls: Any) -> str:
    """``module.qualname`` of a class (or other key of a serializer)."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return _quote(cls)


def _no_serializer_message(obj: Any, codec: str) -> str:
    """The error for an object that no serializer of *codec* handles, naming
    the fixes."""
    name = _type_name(type(obj))
    if isinstance(obj, bytes | bytearray | memoryview):
        # JSON has no bytes; MsgPack encodes them natively (and never gets here).
        return (
            f'No serializer found for type "{name}": {codec} cannot encode bytes; '
            "use the MsgPack codec (codec=aiomas.MsgPack on both sides) or add "
            "a serializer with Codec.add_serializer() (or extra_serializers)"
        )
    return (
        f'No serializer found for type "{name}": add one with '
        "Codec.add_serializer() (or extra_serializers), or decorate the class "
        "with @aiomas.codecs.serializable"
    )


# What Codec._setup() builds, and what MsgPack's adds (see Codec._built).
_CODEC_BUILDS: Final = frozenset(
    {"_serialize", "_deserialize", "_default", "_object_hook"}
)
_MSGPACK_BUILDS: Final = _CODEC_BUILDS | {"_msgpack", "_own_packer", "_unpack_errors"}


class Codec:
    """Base class for all codecs.

    Subclasses implement :meth:`encode` and :meth:`decode` and call
    :meth:`serialize_obj` for objects their format cannot represent (e.g. as the
    ``default`` hook of the encoder) and :meth:`deserialize_obj` for every decoded
    map.  A subclass that overrides ``__init__()`` must call ``super().__init__()``.
    """

    # What _setup() builds: never copied or pickled, but built anew from the
    # rest (see __getstate__).  A subclass that builds more adds its names.
    _built: ClassVar[frozenset[str]] = _CODEC_BUILDS

    def __init__(self) -> None:
        # Keyed by the exact type of the objects a serializer handles; other
        # (hashable) keys take a type id, but no object ever matches them.
        self._serializers: dict[Any, tuple[int, Serializer]] = {}
        self._deserializers: list[Deserializer] = []
        self._setup()

    def _setup(self) -> None:
        """Build what encoding and decoding use from the serializer tables and
        the hooks: on creation, on a copy or unpickling, and when a hook or a
        table is replaced.  A subclass that builds more (an encoder that holds
        the hooks) extends it, calling ``super()._setup()`` first.

        Raises:
            ImportError: if a codec's library is not installed.
        """
        # What serialize_obj() and deserialize_obj() do, as functions of the
        # tables rather than of the codec.
        self._serialize = _serializer(self._serializers, type(self).__name__)
        self._deserialize = _deserializer(self._deserializers)
        # The hooks for encoders and decoders: these functions, unless the
        # methods are overridden (in a subclass or on the instance).  Not
        # bound methods: an encoder or decoder that a codec keeps (JSON's)
        # would make a reference cycle, which keeps each codec (one per
        # connection) until the garbage collector runs.
        self._default, self._object_hook = self._hooks()

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        self._changed(name)

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        self._changed(name)

    def _changed(self, name: str) -> None:
        # Code written for the original aiomas may replace a hook on the
        # instance (``codec.deserialize_obj = ...``) or a serializer table;
        # the hooks are built from them, so build them again.  (Not while
        # __init__() sets the tables: _setup() runs after.  And without
        # looking at __dict__: once made, it slows every attribute lookup.)
        if name in _HOOKS_AND_TABLES and getattr(self, "_object_hook", None):
            self._setup()

    def __getstate__(self) -> dict[str, Any]:
        """The codec's state for :mod:`copy` and :mod:`pickle`: its attributes
        but the hooks and encoders built from them.  A shallow copy shares
        the serializer tables with the original (adding a serializer to one
        adds it to both), a deep copy or an unpickled codec has its own."""
        # (vars() makes the instance's __dict__, which slows its attribute
        # lookups a little from then on; the copy is made without one.)
        built = self._built
        return {name: value for name, value in vars(self).items() if name not in built}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._setup()

    def __repr__(self) -> str:
        types = ", ".join(
            getattr(key, "__qualname__", None) or _quote(key)
            for key in self._serializers
        )
        return f"<{type(self).__name__} codec ({types or 'no extra types'})>"

    def encode(self, data: Any) -> bytes:
        """Encode *data* and return the bytes.

        Raises:
            SerializationError: if *data* (or something in it) cannot be encoded.
            NotImplementedError: in the base class.
        """
        raise NotImplementedError

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode *data* to the original data structure.

        Raises:
            SerializationError: if *data* is not a valid encoded message.
            NotImplementedError: in the base class.
        """
        raise NotImplementedError

    def decode_plain(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode *data* without deserializers: ``__type__`` maps stay maps.

        Channels use it to find the message type and id of a message whose
        content :meth:`decode` could not deserialize, so that they can answer
        that one message with an error instead of closing the connection.

        Raises:
            NotImplementedError: in codecs that do not support it (the base
                class); channels then close the connection as for any other
                undecodable message.
            Exception: whatever decoding raises for malformed data.
        """
        raise NotImplementedError

    def add_serializer(
        self, type: Any, serialize: Serializer, deserialize: Deserializer
    ) -> None:
        """Teach the codec to encode objects of exactly *type* (not subclasses).

        The serializer gets the next type id (0 for the first one added to this
        codec, then 1, ...); the peer must add its serializers in the same order.
        A serializer for :class:`object` is the fall-back for objects of any type
        without a serializer of its own.

        *type* may also be any other hashable key (code written for the original
        aiomas registers ``numpy.array``, a function, beside ``numpy.ndarray``):
        such an entry takes its type id like any other, so the ids of the
        serializers after it match the peer's, but no object is ever encoded
        with it.  Only its deserializer is used, for that type id.

        Args:
            type: The class whose direct instances *serialize* handles (or
                another hashable key, see above).
            serialize: Gets such an object and returns something the codec can
                encode (this may contain objects of other added types).
            deserialize: Gets what *serialize* returned (after a trip through the
                codec: with JSON, tuples become lists) and returns an equivalent
                object.

        Raises:
            TypeError: if *type* is not hashable, or *serialize* or
                *deserialize* is not callable.
            ValueError: if *type* already has a serializer.
        """
        try:
            hash(type)
        except TypeError:
            raise TypeError(
                f"A serializer's key must be a class or another hashable object, "
                f"not the unhashable {_quote(type)}"
            ) from None
        for name, func in (("serialize", serialize), ("deserialize", deserialize)):
            if not callable(func):
                raise TypeError(
                    f'The {name} function for "{_type_name(type)}" is not '
                    f"callable: {_quote(func)}"
                )
        if type in self._serializers:
            raise ValueError(
                f'There is already a serializer for type "{_type_name(type)}"'
            )
        type_id = len(self._deserializers)
        self._serializers[type] = (type_id, serialize)
        self._deserializers.append(deserialize)

    def _hooks(
        self,
    ) -> tuple[Callable[[Any], dict[str, Any]], Callable[[dict[Any, Any]], Any]]:
        """:meth:`serialize_obj` and :meth:`deserialize_obj` as functions that
        hold no reference to the codec."""
        serialize: Callable[[Any], dict[str, Any]] = self._serialize
        deserialize: Callable[[dict[Any, Any]], Any] = self._deserialize
        # An override is called through a weak reference: hooks are only
        # called while the codec encodes or decodes, so it is alive then.
        codec = weakref.ref(self)
        if self._overridden("serialize_obj"):

            def serialize(obj: Any) -> dict[str, Any]:
                return cast(Codec, codec()).serialize_obj(obj)

        if self._overridden("deserialize_obj"):

            def deserialize(obj_repr: dict[Any, Any]) -> Any:
                return cast(Codec, codec()).deserialize_obj(obj_repr)

        return serialize, deserialize

    def _overridden(self, name: str) -> bool:
        """Whether the method *name* of Codec is overridden, by the class or
        on the instance."""
        own = getattr(Codec, name)
        if getattr(type(self), name) is not own:
            return True
        method = getattr(self, name)
        return (
            getattr(method, "__func__", None) is not own
            or getattr(method, "__self__", None) is not self
        )

    def serialize_obj(self, obj: Any) -> dict[str, Any]:
        """Return ``{"__type__": [type_id, serialize(obj)]}`` for *obj*.

        The serializer is looked up by the exact type of *obj*, then the one for
        :class:`object` is tried.

        Raises:
            SerializationError: if there is no serializer for the type of *obj*
                (and none for :class:`object`), or if the serializer raises (its
                exception is the ``__cause__``).
        """
        return self._serialize(obj)

    def deserialize_obj(self, obj_repr: dict[Any, Any]) -> Any:
        """Return the object that the decoded map *obj_repr* stands for.

        Only a map with the single key ``"__type__"`` whose value is a pair
        ``[type_id, data]`` (``type_id`` an :class:`int`) is an added type; it
        becomes ``deserialize(data)`` of the serializer with that id.  Any other
        map is returned unchanged.

        Raises:
            SerializationError: for an unknown type id, or if the deserializer
                raises (its exception is the ``__cause__``).
        """
        return self._deserialize(obj_repr)


def _serializer(
    serializers: dict[Any, tuple[int, Serializer]], codec_name: str
) -> Callable[[Any], dict[str, Any]]:
    """:meth:`Codec.serialize_obj` of a codec with these *serializers*."""

    def serialize_obj(obj: Any) -> dict[str, Any]:
        entry = serializers.get(type(obj))
        if entry is None:
            if type(obj) is int:
                # Only msgpack asks about ints: those outside 64 bits.
                raise SerializationError(
                    f"Cannot encode the int {_quote(obj)}: it does not fit into "
                    "64 bits, the limit of msgpack (add a serializer for int to "
                    "send such numbers)"
                )
            entry = serializers.get(object)
            if entry is None:
                raise SerializationError(_no_serializer_message(obj, codec_name))
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

    return serialize_obj


def _deserializer(deserializers: list[Deserializer]) -> Callable[[dict[Any, Any]], Any]:
    """:meth:`Codec.deserialize_obj` of a codec with these *deserializers*."""

    def deserialize_obj(obj_repr: dict[Any, Any]) -> Any:
        # This runs for every decoded map, so the common case leaves first.
        if len(obj_repr) != 1 or _TYPE_KEY not in obj_repr:
            return obj_repr
        value = obj_repr[_TYPE_KEY]
        if type(value) not in (list, tuple) or len(value) != 2:
            return obj_repr
        type_id, data = value
        if type(type_id) is not int:
            return obj_repr
        if not 0 <= type_id < len(deserializers):
            raise SerializationError(
                f"Unknown type id {type_id} in a {_TYPE_KEY!r} map: this codec has "
                f"{len(deserializers)} serializer(s); both peers must add the "
                "same serializers in the same order"
            )
        try:
            return deserializers[type_id](data)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"Deserializing type id {type_id} failed: {exc!r}"
            ) from exc

    return deserialize_obj


# Attributes the hooks are built from (see Codec._changed).
_HOOKS_AND_TABLES: Final = frozenset(
    {"serialize_obj", "deserialize_obj", "_serializers", "_deserializers"}
)


class JSON(Codec):
    """A :class:`Codec` that uses JSON.

    The output is exactly ``json.dumps(data).encode()`` (default separators, ASCII
    only, ``NaN`` and ``Infinity`` allowed), so ``['spam', 3.14]`` becomes
    ``b'["spam", 3.14]'``.  Input must be UTF-8.  Lists and tuples both decode to
    lists.  Like a connection's codec, an instance encodes in one thread at a
    time.
    """

    _built = _CODEC_BUILDS | {
        "_encoder",
        "_decoder",
        "_scan_once",
        "_markers",
        "_encode_chunks",
    }

    def _setup(self) -> None:
        super()._setup()
        # json.dumps()/loads() with arguments build a new encoder or decoder for
        # every call; each message goes through here, so build them once.
        self._encoder = json.JSONEncoder(default=self._default)
        self._decoder = json.JSONDecoder(object_hook=self._object_hook)
        # The decoder's scanner (not in typeshed): decode() calls it.
        self._scan_once: Callable[[str, int], tuple[Any, int]] = self._decoder.scan_once  # type: ignore[attr-defined]
        # JSONEncoder.encode() builds its C encoder anew for every call; this
        # one is built once, with what json.dumps() uses by default.  The
        # containers being encoded are in _markers (to find circular
        # references); a failed call leaves some there.
        self._markers: dict[int, Any] = {}
        make_encoder = getattr(json.encoder, "c_make_encoder", None)
        self._encode_chunks: Callable[[Any, int], Any] | None = (
            None
            if make_encoder is None  # (Python builds without the _json module)
            else make_encoder(
                self._markers,
                self._default,
                json.encoder.encode_basestring_ascii,
                None,  # indent
                ": ",
                ", ",
                False,  # sort_keys
                False,  # skipkeys
                True,  # allow_nan
            )
        )

    def encode(self, data: Any) -> bytes:
        """Encode *data* as JSON.

        Raises:
            SerializationError: if *data* contains an object without serializer,
                a circular reference, a dict key that is not a str, int, float,
                bool or None (those become strings, as with :mod:`json`), an int
                with too many digits or too deep nesting, or if a serializer
                fails.
        """
        # A serializer that encodes with this codec while it encodes (markers
        # in use) gets an encoder of its own, as json.dumps() would.
        encode_chunks = None if self._markers else self._encode_chunks
        try:
            # ensure_ascii makes the text pure ASCII, so this never fails.
            if encode_chunks is not None:
                return "".join(encode_chunks(data, 0)).encode()
            return self._encoder.encode(data).encode()
        except BaseException as exc:
            if encode_chunks is not None:
                self._markers.clear()
            if isinstance(exc, _ENCODE_ERRORS):
                raise SerializationError(
                    f"Cannot encode {_quote(data)} as JSON: {exc}"
                ) from exc
            raise

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode the UTF-8 JSON text *data*.

        Raises:
            SerializationError: if *data* is not UTF-8, not JSON, too deeply
                nested, or if a deserializer fails.
        """
        try:
            text = str(data, "utf-8")
            # JSONDecoder.decode() in short (and without its two Python
            # frames): what we and json.dumps() write has no whitespace around
            # the value; anything else takes the long way, which also makes
            # the error messages.
            try:
                value, end = self._scan_once(text, 0)
            except StopIteration:
                pass
            else:
                if end == len(text):
                    return value
            return self._decoder.decode(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise SerializationError(f"Cannot decode JSON: {exc}") from exc

    def decode_plain(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode *data* without deserializers (see :meth:`Codec.decode_plain`)."""
        return json.loads(str(data, "utf-8"))


class MsgPack(Codec):
    """A :class:`Codec` that uses msgpack.

    Supports :class:`bytes`.  Arrays decode to tuples; map keys may be of any
    hashable type (older peers send int keys).

    Raises:
        ImportError: on creation, if msgpack is not installed.
    """

    _extra: ClassVar[str] = "mp"  # the extra that installs what the codec needs
    # Whether the class (or a base below MsgPack) has a _new_packer() of its own.
    _packer_of_its_own: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_new_packer" in vars(cls):
            cls._packer_of_its_own = True

    _built = _MSGPACK_BUILDS

    def _setup(self) -> None:
        super()._setup()
        try:
            import msgpack
        except ImportError as exc:
            raise ImportError(
                f"The {type(self).__name__} codec needs the msgpack package: "
                f"pip install 'aiomas[{self._extra}]'"
            ) from exc
        self._msgpack = msgpack
        # Codecs whose packer differs (a subclass' own _new_packer()) keep it
        # to themselves; all others share their thread's (see _SharedPacker).
        self._own_packer = _SharedPacker() if self._packer_of_its_own else None
        self._unpack_errors = (
            msgpack.UnpackException,
            ValueError,
            TypeError,
            RecursionError,
        )

    def _new_packer(self, default: Callable[[Any], Any] | None = None) -> Any:
        return self._msgpack.Packer(
            default=self._default if default is None else default,
            use_bin_type=True,
            buf_size=_PACKER_BUFFER,
        )

    def encode(self, data: Any) -> bytes:
        """Encode *data* with msgpack.

        Raises:
            SerializationError: if *data* contains an object without serializer,
                an int outside the 64-bit range, too deep nesting, or if a
                serializer fails.
        """
        shared = self._own_packer or _thread_state.shared_packer
        if shared.codec is not None:
            # A serializer called encode() while the shared packer is in the
            # middle of a message; packing into it would splice the two messages.
            return self._pack(self._new_packer(), data)
        packer = shared.packer
        if packer is None:
            packer = shared.packer = self._new_packer(shared.serialize)
        shared.codec = self
        try:
            packed: bytes = packer.pack(data)
        except BaseException as exc:
            self._pack_failed(packer, data, exc)
            raise
        finally:
            shared.codec = None
        if len(packed) > _PACKER_KEEP:
            # The packer's buffer grew to the size of this message; don't keep
            # that much.
            shared.packer = None
        return packed

    def _pack(self, packer: Any, data: Any) -> bytes:
        try:
            packed: bytes = packer.pack(data)
        except BaseException as exc:
            self._pack_failed(packer, data, exc)
            raise
        return packed

    def _pack_failed(self, packer: Any, data: Any, exc: BaseException) -> None:
        """Clean up after *packer* failed to pack *data* with *exc*.

        Raises:
            SerializationError: if *exc* is an encoding error (else the caller
                raises *exc* itself).
        """
        # A half-packed message must not stay in the buffer and become the
        # start of the next one (recent msgpack versions also do this).
        packer.reset()
        if isinstance(exc, _ENCODE_ERRORS):
            raise SerializationError(
                f"Cannot encode {_quote(data)} with msgpack: {exc}"
            ) from exc

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode the msgpack data *data*.

        Raises:
            SerializationError: if *data* is not one complete msgpack object,
                contains invalid UTF-8, is too deeply nested, or if a
                deserializer fails.
        """
        try:
            return self._msgpack.unpackb(
                data,
                raw=False,
                use_list=False,
                strict_map_key=False,
                object_hook=self._object_hook,
            )
        except self._unpack_errors as exc:
            raise SerializationError(f"Cannot decode msgpack: {exc!r}") from exc

    def decode_plain(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode *data* without deserializers (see :meth:`Codec.decode_plain`)."""
        return self._msgpack.unpackb(
            data, raw=False, use_list=False, strict_map_key=False
        )


# The first buffer of a msgpack Packer, and the largest message after which a
# packer (and its grown buffer) is kept for the next message.  (Replacing the
# packer after every big message makes big messages slow, so only really big
# ones do.)
_PACKER_BUFFER: Final = 16 * 1024
_PACKER_KEEP: Final = 8 * 1024 * 1024


class _SharedPacker:
    """The msgpack Packer of a thread, shared by all its MsgPack codecs.

    A Packer's buffer grows to the largest message it packed and never
    shrinks; shared, that costs up to twice the largest message per thread,
    not per connection.  (Encoding never waits, so the codecs of one thread
    take turns.)
    """

    __slots__ = ("codec", "packer")

    def __init__(self) -> None:
        self.packer: Any = None
        self.codec: MsgPack | None = None  # the codec whose encode() runs

    def serialize(self, obj: Any) -> Any:
        """The packer's ``default``: the running codec's serializers."""
        assert self.codec is not None  # (only called from within encode())
        # (Its hook, not serialize_obj(), which would take one call more.)
        return self.codec._default(obj)  # noqa: SLF001 (the same module's codec)


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.shared_packer = _SharedPacker()


_thread_state = _ThreadState()


# A Blosc 1 chunk starts with a 16-byte header: version, versionlz, flags and
# typesize (one byte each), then the little-endian uint32s nbytes (size of the
# decompressed data), blocksize and cbytes (size of the whole chunk).
_BLOSC_SIZES: Final = struct.Struct("<4xI4xI")
_BLOSC_HEADER_SIZE: Final = 16


class MsgPackBlosc(MsgPack):
    """A :class:`Codec` that uses msgpack and compresses the result with Blosc.

    Raises:
        ImportError: on creation, if msgpack or blosc is not installed.
    """

    _extra = "mpb"

    max_decompressed_size: int = 256 * 2**20
    """The largest decompressed message (in bytes) that :meth:`decode` accepts.

    Blosc can shrink data by a factor of several hundred, so a small message could
    otherwise make us allocate gigabytes.  Set it on the class or on an instance;
    both peers should allow the largest message they send.
    """

    _built = _MSGPACK_BUILDS | {"_blosc"}

    def _setup(self) -> None:
        super()._setup()
        try:
            import blosc
        except ImportError as exc:
            raise ImportError(
                f"The {type(self).__name__} codec needs the blosc package: "
                f"pip install 'aiomas[{self._extra}]'"
            ) from exc
        self._blosc = blosc

    def encode(self, data: Any) -> bytes:
        """Encode *data* with msgpack and compress it.

        Raises:
            SerializationError: as :meth:`MsgPack.encode`, or if the packed data
                is larger than Blosc can compress (``blosc.MAX_BUFFERSIZE``).
        """
        packed = super().encode(data)
        if len(packed) > self._blosc.MAX_BUFFERSIZE:
            raise SerializationError(
                f"Message of {len(packed)} bytes is too large for Blosc "
                f"(at most {self._blosc.MAX_BUFFERSIZE} bytes)"
            )
        compressed: bytes = self._blosc.compress(packed, typesize=8)
        return compressed

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decompress *data* and decode it with msgpack.

        Raises:
            SerializationError: as :meth:`MsgPack.decode`, or if *data* is not one
                Blosc chunk or would decompress to more than
                :attr:`max_decompressed_size` bytes.
        """
        return super().decode(self._decompress(data))

    def decode_plain(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode *data* without deserializers (see :meth:`Codec.decode_plain`)."""
        return super().decode_plain(self._decompress(data))

    def _decompress(self, data: bytes | bytearray | memoryview) -> bytes:
        try:
            view = memoryview(data).cast("B")
        except TypeError as exc:
            raise SerializationError(f"Cannot decode Blosc: {exc}") from exc
        # The checks run on the header alone, before Blosc allocates anything.
        if len(view) < _BLOSC_HEADER_SIZE:
            raise SerializationError(
                f"Cannot decode Blosc: {len(view)} bytes are too short for a header"
            )
        nbytes, cbytes = _BLOSC_SIZES.unpack_from(view)
        if cbytes != len(view):
            raise SerializationError(
                f"Cannot decode Blosc: the header says {cbytes} bytes, got {len(view)}"
            )
        if nbytes > self.max_decompressed_size:
            raise SerializationError(
                f"Refusing to decompress {nbytes} bytes (max_decompressed_size is "
                f"{self.max_decompressed_size})"
            )
        try:
            packed: bytes = self._blosc.decompress(view)
        except Exception as exc:  # blosc's own error type is not public
            raise SerializationError(f"Cannot decode Blosc: {exc!r}") from exc
        return packed


@overload
def serializable(cls: _C, *, repr: bool = True) -> _C: ...


@overload
def serializable(cls: None = None, *, repr: bool = True) -> Callable[[_C], _C]: ...


def serializable(
    cls: _C | None = None, *, repr: bool = True
) -> _C | Callable[[_C], _C]:
    """Class decorator that makes the decorated class serializable by a codec.

    Use it as ``@serializable`` or ``@serializable(repr=False)``.  The values of
    the parameters of the class' ``__init__()`` must be available as attributes of
    the same name.  The decorator adds these methods, unless the class body
    defines them itself:

    - ``__asdict__()``: a dict that maps each ``__init__`` parameter to the value
      of the attribute of the same name;
    - ``__fromdict__(attrs)`` (class method): a new instance, created as
      ``cls(**attrs)`` (positional-only parameters are passed by position);
    - ``__serializer__()`` (static method): the ``(type, serialize, deserialize)``
      tuple for :meth:`Codec.add_serializer`; pass ``cls.__serializer__`` itself
      in ``extra_serializers``;
    - ``__repr__()`` like ``A(x=1, y=2)``, unless *repr* is false.

    Args:
        cls: The class to decorate.
        repr: Whether to add ``__repr__()``.

    Returns:
        The class itself (or, without *cls*, a decorator).

    Raises:
        TypeError: if ``__init__`` takes ``*args`` or ``**kwargs``: their values
            cannot be found in attributes, so write a serializer yourself.
    """

    def decorate(cls: _C) -> _C:
        params = _init_parameters(cls)
        names = tuple(param.name for param in params)
        positional = tuple(
            param.name for param in params if param.kind is param.POSITIONAL_ONLY
        )

        def __asdict__(self: Any) -> dict[str, Any]:
            """Return the ``__init__()`` arguments that recreate this object."""
            return {name: getattr(self, name) for name in names}

        def __fromdict__(klass: type, attrs: Mapping[str, Any]) -> Any:
            """Create an instance from a dict made by ``__asdict__()``.

            Raises:
                TypeError: if *attrs* is not a :class:`dict` (a peer may send
                    anything; ``cls(**attrs)`` would call methods of, e.g., a
                    proxy).
            """
            if not isinstance(attrs, dict):
                raise TypeError(
                    f"{klass.__qualname__} expects a map of attributes, "
                    f"got {type(attrs).__qualname__}"
                )
            if not positional:
                return klass(**attrs)
            kwargs = dict(attrs)
            args = [kwargs.pop(name) for name in positional]
            return klass(*args, **kwargs)

        def __serializer__() -> tuple[type, Serializer, Deserializer]:
            """Return the arguments for ``Codec.add_serializer()``."""
            # Looked up now, so that methods the class defines itself are used.
            klass: Any = cls
            return cls, klass.__asdict__, klass.__fromdict__

        def __repr__(self: Any) -> str:
            args = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
            return f"{type(self).__name__}({args})"

        methods: dict[str, Any] = {
            "__asdict__": __asdict__,
            "__fromdict__": __fromdict__,
            "__serializer__": __serializer__,
        }
        if repr:
            methods["__repr__"] = __repr__
        for name, method in methods.items():
            if name in cls.__dict__:
                continue
            method.__qualname__ = f"{cls.__qualname__}.{name}"
            method.__module__ = cls.__module__
            if name == "__fromdict__":
                method = classmethod(method)
            elif name == "__serializer__":
                method = staticmethod(method)
            elif name == "__repr__":
                # An object that contains itself must not recurse forever.
                method = reprlib.recursive_repr()(method)
            setattr(cls, name, method)
        return cls

    if cls is None:
        return decorate
    return decorate(cls)


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    """Return the parameters of ``cls.__init__()`` without ``self``.

    Raises:
        TypeError: for ``*args`` and ``**kwargs`` parameters, or if the
            signature cannot be found.
    """
    init = inspect.getattr_static(cls, "__init__")
    try:
        if init is object.__init__:
            # No __init__ of its own: the class' signature (maybe from __new__)
            # is what it takes.
            params = list(inspect.signature(cls).parameters.values())
        else:
            params = list(inspect.signature(init).parameters.values())
            if params and params[0].kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                params = params[1:]  # self
    except ValueError as exc:
        raise TypeError(
            f"@serializable cannot find the parameters of {cls.__qualname__}"
        ) from exc
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"@serializable cannot handle the parameter {param} of "
                f"{cls.__qualname__}.__init__(): its value is not an attribute; "
                "write a serializer for Codec.add_serializer() instead"
            )
    return params
