"""Routing of RPC paths to exposed functions: :func:`expose`, :class:`Router`,
:class:`Service` and :class:`ServiceDict`.

This is the half of :mod:`aiomas.rpc` that needs no connection and no event
loop: it maps a path like ``"agents/0/spam"`` to a function, by static lookups
only, and knows the path of every router for the way back (a service sent to a
peer travels as its path).  :mod:`aiomas.rpc` re-exports the public names; use
them from there.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from types import FunctionType, MethodType
from typing import Any, ClassVar, Final, TypeVar

from aiomas._compiled import mypyc_attr
from aiomas.protocol import abbreviate

__all__ = [
    "Router",
    "Service",
    "ServiceDict",
    "expose",
    "router_of",
    "short_repr",
]

F = TypeVar("F", bound=Callable[..., Any])

_RPC_MARKER: Final = "__rpc__"
# The method that Service calls on an object with its new router (see Service).
_MADE_HOOK: Final = "__rpc_router_made__"


def expose(func: F) -> F:
    """Decorator that makes *func* callable via RPC.

    The function is not wrapped; it only gains an ``__rpc__`` attribute.
    """
    setattr(func, _RPC_MARKER, True)
    return func


def _is_exposed(attr: Any) -> bool:
    """Whether :func:`expose` marked *attr*, found without running its code (a
    peer must not make us call ``__getattr__`` of whatever an agent holds)."""
    kind = type(attr)
    if kind is FunctionType:  # the common case, quickly
        return attr.__dict__.get(_RPC_MARKER) is True
    if kind is MethodType:  # e.g. obj.method in a ServiceDict
        return _is_exposed(attr.__func__)
    if issubclass(kind, staticmethod | classmethod):
        # @expose may sit inside or outside of @staticmethod / @classmethod.
        return attr.__dict__.get(_RPC_MARKER) is True or _is_exposed(attr.__func__)
    return _marked(attr)


def _marked(obj: Any) -> bool:
    return inspect.getattr_static(obj, _RPC_MARKER, False) is True


def short_repr(value: Any) -> str:
    """The repr of *value*, shortened: error messages go back to the peer, and
    a hostile peer must not make us send its 10 kB path back twice."""
    return abbreviate(value, 200)


def _is_invalid_component(name: str) -> bool:
    return not name or name.startswith("_") or name == ".."


def _invalid_component_error(name: str, path: str) -> LookupError:
    return LookupError(
        f"Invalid component {short_repr(name)} in RPC path {short_repr(path)}"
    )


@mypyc_attr(allow_interpreted_subclasses=True)
class Router:
    """Resolves paths to the exposed functions of its object *obj* and its
    sub-services, and knows its own path for the reverse lookup.

    Routers form a tree: :attr:`parent` and :attr:`name` place a router in it,
    and :attr:`path` and :attr:`root` are read from them.  :meth:`resolve` walks
    down the tree through two hooks, which subclasses may override (and other
    layers call) to look children up elsewhere:

    * :meth:`sub_router` gives the router of the sub-service at one path
      component, :meth:`function` the exposed function at the last one.
      Both get a name that :meth:`resolve` has checked already (not empty, no
      ``/``, no leading ``_``, not ``..``), return ``None`` for a name that
      is not there (they raise nothing), and run no code of the service
      object: a peer chooses the names.
    * :meth:`children` lists the routers below this one, as far as they are
      known without running code of the service; :meth:`attach_declared`
      walks the tree with it.  A subclass that overrides :meth:`sub_router`
      overrides it too.

    Sub-services are attached with :meth:`set_sub_router` (or :meth:`add`),
    declared for later with :meth:`declare` (which :class:`Service` does), or
    stored in the dict of a :class:`ServiceDict`, whose router finds them
    there on each lookup; such a router needs only its :attr:`parent` and
    :attr:`name` set for its path (an :class:`~aiomas.Container` does this for
    each agent).

    Args:
        obj: The service object: a class instance, a class or a
            :class:`ServiceDict`.
    """

    __slots__ = ("__weakref__", "_declared", "_sub_routers", "name", "obj", "parent")

    expose: ClassVar = staticmethod(expose)
    """Alias for :func:`expose`."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        """The object to which this router belongs."""
        self.name = ""
        """The name of the router (empty for root routers)."""
        self.parent: Router | None = None
        """The parent router or ``None`` for root routers."""
        # Both are made on first use: a program may have many routers (one per
        # agent) and most of them have no sub-routers.
        self._sub_routers: dict[str, Router] | None = None
        # Sub-services declared by Service(sub_routers) whose attributes did not
        # exist yet when the router was made (e.g. still in __init__).
        self._declared: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<Router {self.path!r} of {type(self.obj).__name__}>"

    @property
    def path(self) -> str:
        """The path to this router (without trailing slash)."""
        names = []
        router: Router | None = self
        while router is not None and router.parent is not None:
            names.append(router.name)
            router = router.parent
        return "/".join(reversed(names))

    @property
    def root(self) -> Router:
        """The topmost router of this router's hierarchy."""
        router = self
        while router.parent is not None:
            router = router.parent
        return router

    def add(self, name: str) -> None:
        """Add the sub-router of the service stored at ``self.obj.<name>``."""
        service = getattr(self.obj, name)
        router = getattr(service, "router", None)
        if not isinstance(router, Router):
            raise ValueError(f"Attribute {name!r} of {self.obj!r} is no RPC service")
        self.set_sub_router(router, name)

    def set_sub_router(self, router: Router, name: str) -> None:
        """Make *router* the sub-router *name* of this router."""
        if _is_invalid_component(name):
            raise _invalid_component_error(name, name)
        if "/" in name:
            raise ValueError(f"A sub-router name must not contain '/': {name!r}")
        router.parent = self
        router.name = name
        if self._sub_routers is None:
            self._sub_routers = {}
        self._sub_routers[name] = router

    def resolve(self, path: Any) -> Callable[..., Any]:
        """Return the exposed function at *path* (components separated by ``/``).

        Only attributes marked by :func:`expose` and declared sub-services are
        reachable; names starting with ``_`` never are.  The object is not touched
        (no attribute lookup that could run code) until the path is known to be
        valid.

        Raises:
            LookupError: if there is no exposed function at *path* (or *path*
                is not a string: a peer may send anything).
        """
        if type(path) is str:
            components, name = _valid_paths.get(path) or _split_path(path)
        elif isinstance(path, str):
            # (A subclass may hash and compare its own way: never looked up.)
            components, name = _split_path(path)
        else:
            raise LookupError(f"An RPC path must be a string, not {short_repr(path)}")
        router = self
        for component in components:
            sub = router.sub_router(component)
            if sub is None:
                raise LookupError(
                    f"No RPC service {short_repr(component)} in path {short_repr(path)}"
                )
            router = sub
        func = router.function(name)
        if func is None:
            raise LookupError(
                f"No exposed function {short_repr(name)} at RPC path {short_repr(path)}"
            )
        return func

    def sub_router(self, name: str) -> Router | None:
        """The router of the sub-service *name*, or ``None`` if there is none.

        A hook of :meth:`resolve`, called for each path component but the
        last with a valid *name* (see :class:`Router`).  This one looks in
        the attached sub-routers, attaches *name* first if it was declared
        (:meth:`declare`), and for a :class:`ServiceDict` also looks at the
        service stored under *name* in its dict.  It runs no code of the
        service but our own (:class:`Service`).
        """
        routers = self._sub_routers
        if routers is not None:
            router = routers.get(name)
            if router is not None:
                return router
        if name in self._declared:
            self.declare()
            routers = self._sub_routers
            return None if routers is None else routers.get(name)
        obj = self.obj
        if issubclass(type(obj), ServiceDict):
            # A service added to the dict after the ServiceDict was made.
            return _router_in(obj.dict.get(name))
        return None

    def attach_declared(self) -> None:
        """Attach the declared sub-services that did not exist yet when their
        routers were made, in this router's whole tree.

        Calls attach them on their way (:meth:`sub_router`); this is for
        services sent before any call reached them: :mod:`aiomas.rpc` calls
        it on the root of its service before it refuses to send a service it
        does not find in that tree.  The walk follows :meth:`children`, visits
        each router once and skips sub-services that are no service (yet).
        """
        pending = [self]
        seen: set[int] = set()
        while pending:
            router = pending.pop()
            if id(router) in seen:
                continue
            seen.add(id(router))
            with contextlib.suppress(ValueError, AttributeError):
                # Not a service (yet): some other part of the tree, which
                # must not keep this one from being sent.
                router.declare()
            pending.extend(router.children())

    def children(self) -> Iterable[Router]:
        """The routers directly below this one: the sub-services attached so
        far and, for a :class:`ServiceDict`, the services in its dict.

        A hook of :meth:`attach_declared`; like :meth:`sub_router` it runs no
        code of the service but our own.  Declared sub-services that are not
        attached yet are not among them.
        """
        routers = self._sub_routers
        children = [] if routers is None else list(routers.values())
        if issubclass(type(self.obj), ServiceDict):
            for name, value in self.obj.dict.items():
                if routers is None or name not in routers:
                    router = _router_in(value)
                    if router is not None:
                        children.append(router)
        return children

    def declare(self, names: Iterable[str] = ()) -> None:
        """Declare the sub-services stored at ``self.obj.<name>`` for each of
        *names*; those that exist now are added (see :meth:`add`), the others
        when they are first asked for.  Without *names*, it tries again to add
        the ones still missing.  :class:`Service` calls it with its
        *sub_routers* when it makes a router.

        Raises:
            ValueError: if such an attribute is no RPC service.
        """
        if names:
            self._declared = (*self._declared, *names)
        if not self._declared:
            return
        missing = []
        for name in self._declared:
            if _static_lookup(self.obj, name) is _MISSING:
                missing.append(name)
            else:
                self.add(name)
        self._declared = tuple(missing)

    def function(self, name: str) -> Callable[..., Any] | None:
        """The exposed function *name* of this router's object, or ``None``
        if there is none (or it is not exposed).

        A hook of :meth:`resolve`, called for the last path component with a
        valid *name* (see :class:`Router`).  The attribute is found by static
        lookups only; an attribute of an instance hides the class' one.  A
        method is returned bound, which runs no code of the service.
        """
        obj = self.obj
        # (Checks of type(obj), not isinstance(), which asks the object for
        # its __class__: code of the service, and a lookup more.)
        kind = type(obj)
        if issubclass(kind, ServiceDict):
            func = obj.dict.get(name)
            return func if callable(func) and _is_exposed(func) else None
        if issubclass(kind, type):  # a class as the service: its own attributes
            attr = _class_lookup(obj, name)
            if attr is _MISSING or not _is_exposed(attr):
                return None
            bound = getattr(obj, name)
            return bound if callable(bound) else None
        # (_class_lookup(), inlined: this runs for every call of an agent's
        # method.)  Methods live in the class: finding them there is much
        # faster than inspect.getattr_static().
        for klass in kind.__mro__:
            attr = klass.__dict__.get(name, _MISSING)
            if attr is not _MISSING:
                break
        else:
            attr = _MISSING
        if type(attr) is FunctionType and kind.__getattribute__ is _get_attribute:
            # Python's own lookup finds a function of the class (no data
            # descriptor) only after the instance's attributes, and binds it:
            # that runs no code of the service, and leaves the instance's
            # __dict__ unmade (made, it costs 64 bytes per agent on 3.11).
            found = object.__getattribute__(obj, name)
            if type(found) is MethodType and found.__func__ is attr:
                return found if attr.__dict__.get(_RPC_MARKER) is True else None
            # An attribute of the instance hides the class' one: only an
            # exposed function stored there counts.
            return found if _is_exposed(found) and callable(found) else None
        own = _instance_lookup(obj, name)
        if own is not _MISSING:
            return own if _is_exposed(own) and callable(own) else None
        if attr is _MISSING or not _is_exposed(attr):
            return None
        # Binding an exposed function (or static/class method) runs no user code.
        bound = getattr(obj, name)
        return bound if callable(bound) else None


_MISSING: Final = object()
_get_attribute: Final[Any] = object.__getattribute__  # (an unbound slot)
# Valid paths, split (see _split_path()): at most this many, of at most this
# many characters (peers choose them, and may send long ones).
_MAX_VALID_PATHS: Final = 4096
_MAX_KEPT_PATH: Final = 256
_valid_paths: dict[str, tuple[tuple[str, ...], str]] = {}


def _split_path(path: str) -> tuple[tuple[str, ...], str]:
    """The components of a valid *path* but the last, and the last; kept
    for the next call (most calls name a path that came before).  Whether
    a path is valid depends on the path alone.

    Raises:
        LookupError: if a component is empty, ``..`` or starts with ``_``.
    """
    components = path.split("/")
    # Whether a component is empty, ``..`` or starts with ``_`` (the checks
    # of _is_invalid_component() for all components at once, in C).
    if (
        not path
        or path[0] in "/_"
        or path[-1] == "/"
        or "//" in path
        or "/_" in path
        or (".." in path and ".." in components)
    ):
        # The first culprit goes into the error message.
        culprit = next(filter(_is_invalid_component, components))
        raise _invalid_component_error(culprit, path)
    name = components.pop()
    parts = (tuple(components), name)
    if type(path) is str and len(path) <= _MAX_KEPT_PATH:
        if len(_valid_paths) >= _MAX_VALID_PATHS:
            _valid_paths.clear()
        _valid_paths[path] = parts
    return parts


def _class_lookup(cls: type, name: str) -> Any:
    """Find class attribute *name* along *cls*' MRO without running code."""
    for klass in cls.__mro__:
        attr = klass.__dict__.get(name, _MISSING)
        if attr is not _MISSING:
            return attr
    return _MISSING


def _instance_lookup(obj: Any, name: str) -> Any:
    """Find *name* in the ``__dict__`` of *obj* (if it has one) without running
    descriptors or ``__getattr__``."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return _MISSING
    return attrs.get(name, _MISSING) if type(attrs) is dict else _MISSING


def _static_lookup(obj: Any, name: str) -> Any:
    """Find attribute *name* of *obj* without running descriptors or __getattr__."""
    try:
        return inspect.getattr_static(obj, name)
    except AttributeError:
        return _MISSING


# A descriptor (with __set__, which native classes cannot be): a Python class.
@mypyc_attr(native_class=False)
class Service:
    """Descriptor that gives every instance of a class its own :class:`Router`.

    Name the class attribute ``router``::

        class Spam:
            router = aiomas.rpc.Service()

    The router is made on first access and kept in the instance attribute
    ``_aiomas_<name>`` (``_aiomas_router`` for the usual name): a class with
    ``__slots__`` lists that name among them, as :class:`~aiomas.Agent` does.
    If the class defines a method ``__rpc_router_made__(self, router)``, it is
    called with each new router (after its *sub_routers* were declared)
    before it is first returned: the place to set
    the router's :attr:`~Router.parent` and :attr:`~Router.name` for a service
    that knows where it lives (:class:`~aiomas.Agent` does, so that nothing is
    built for an agent until its router is used).  If declaring or the hook
    raises, the error comes out of the access, and the next access makes the
    router again.

    Args:
        sub_routers: Names of attributes that hold sub-services (instances with a
            router or :class:`ServiceDict` objects); they are reachable under the
            same names.  They may be set after the router is made (see
            :meth:`Router.declare`).
    """

    __slots__ = ("_attr", "sub_routers")

    expose = staticmethod(expose)
    """Alias for :func:`expose`."""

    def __init__(self, sub_routers: Iterable[str] = ()) -> None:
        self.sub_routers = tuple(sub_routers)
        self._attr = "_aiomas_router"

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_aiomas_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        # object.__getattribute__(), not getattr(): a router not made yet must
        # not make us run the service's __getattr__ (a peer's call may get
        # here).  The exception costs once per router.
        router: Router | None
        try:
            router = object.__getattribute__(obj, self._attr)
        except AttributeError:
            router = None
        if router is None:
            router = Router(obj)
            try:
                setattr(obj, self._attr, router)
            except AttributeError:
                raise TypeError(
                    f"{type(obj).__qualname__} instances need a __dict__ or a "
                    f"{self._attr!r} slot to hold their RPC router"
                ) from None
            try:
                if self.sub_routers:
                    router.declare(self.sub_routers)
                made = getattr(type(obj), _MADE_HOOK, None)
                if made is not None:
                    made(obj, router)
            except BaseException:
                # Half made: the next access makes it again, and tells again.
                setattr(obj, self._attr, None)
                raise
        return router

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError("The router of an RPC service cannot be replaced")


# Made by users around their own dicts, never on the hot path: a Python class.
@mypyc_attr(native_class=False)
class ServiceDict:
    """Wraps a dict of exposed functions and sub-services as an RPC service.

    Values that have a ``router`` (service instances and other ServiceDicts) become
    sub-services under their key.  Services put into :attr:`dict` later are
    reachable too; set their router's ``parent`` (to this router) and ``name``
    (to the key) so that their :attr:`Router.path` is right when they are sent
    to a peer.

    Args:
        dict: The functions and sub-services by name.
    """

    __slots__ = ("__weakref__", "dict", "router")

    def __init__(self, dict: Mapping[str, Any] | None = None) -> None:
        self.dict: builtins.dict[str, Any] = {} if dict is None else {**dict}
        """The wrapped dict."""
        self.router = Router(self)
        """The dict's router."""
        for name, value in self.dict.items():
            sub = getattr(value, "router", None)
            if isinstance(sub, Router):
                self.router.set_sub_router(sub, name)

    def __repr__(self) -> str:
        return f"ServiceDict({self.dict!r})"


def _router_in(value: Any) -> Router | None:
    """The router of a service stored in a :class:`ServiceDict`, found without
    running any code of the value's class but our own :class:`Service`."""
    if issubclass(type(value), ServiceDict):
        services: ServiceDict = value
        return services.router
    attr = _class_lookup(type(value), "router")
    if issubclass(type(attr), Service):
        router: Router = attr.__get__(value, type(value))
        return router
    own = _instance_lookup(value, "router")
    return own if issubclass(type(own), Router) else None


def router_of(service: Any) -> Router:
    """The router of the RPC service *service* (its ``router`` attribute).

    Raises:
        ValueError: if *service* has no ``router`` that is a :class:`Router`.
    """
    router = getattr(service, "router", None)
    if not isinstance(router, Router):
        raise ValueError(
            f"{service!r} is no RPC service: it needs a 'router' attribute that "
            "is an aiomas.rpc.Router (use aiomas.rpc.Service or ServiceDict)"
        )
    return router
