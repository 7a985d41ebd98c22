"""Tests for aiomas._routing (re-exported by aiomas.rpc): expose, routers,
services and service dicts.  Routing needs no connection and no event loop."""

from __future__ import annotations

import ast
import asyncio
import functools
import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import aiomas
from aiomas import _routing
from aiomas._routing import Router, Service, ServiceDict, expose, router_of


@expose
def add(a: int, b: int) -> int:
    return a + b


def not_exposed() -> str:
    return "secret"


class Calculator:
    router = Service(["inner"])

    def __init__(self) -> None:
        self.inner = ServiceDict({"add": add})
        self.touched = False

    @expose
    def mul(self, a: int, b: int) -> int:
        return a * b

    @expose
    async def slow_mul(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a * b

    @expose
    @staticmethod
    def neg(a: int) -> int:
        return -a

    def hidden(self) -> str:
        return "secret"

    @property
    def dangerous(self) -> str:
        self.touched = True
        return "should never run"

    @expose
    def _private(self) -> str:
        return "secret"


def test_expose_only_marks_the_function() -> None:
    def func() -> None:
        pass

    assert expose(func) is func
    assert func.__rpc__ is True  # type: ignore[attr-defined]
    assert Service.expose is expose
    assert Router.expose is expose


def test_service_descriptor_gives_each_instance_its_own_router() -> None:
    assert isinstance(Calculator.router, Service)
    a, b = Calculator(), Calculator()
    assert isinstance(a.router, Router)
    assert a.router is a.router
    assert a.router is not b.router
    assert a.router.obj is a
    assert (a.router.name, a.router.parent, a.router.path) == ("", None, "")
    with pytest.raises(AttributeError):
        a.router = Router(a)  # type: ignore[misc]


def test_a_service_class_may_place_each_new_router() -> None:
    parent = Router(object())
    placed: list[Router] = []

    @expose
    def f() -> str:
        return "f"

    class Placed:
        router = Service(["sub"])

        def __init__(self, name: str) -> None:
            self.name = name
            self.sub = ServiceDict({"f": f})

        def __rpc_router_made__(self, router: Router) -> None:
            placed.append(router)
            parent.set_sub_router(router, self.name)

    a, b = Placed("a"), Placed("b")
    assert placed == []
    assert a.router.path == "a"
    assert a.router.resolve("sub/f") is f
    assert b.router.root is parent
    assert placed == [a.router, b.router]
    assert a.router is a.router
    assert len(placed) == 2


def test_resolve_functions_and_sub_services() -> None:
    calc = Calculator()
    assert calc.router.resolve("mul")(3, 4) == 12
    assert calc.router.resolve("neg")(3) == -3
    assert calc.router.resolve("inner/add")(3, 4) == 7
    inner = calc.inner.router
    assert (inner.name, inner.parent, inner.path) == ("inner", calc.router, "inner")
    assert inner.root is calc.router


@pytest.mark.parametrize(
    "path",
    [
        "hidden",
        "dangerous",
        "_private",
        "__class__",
        "__init__",
        "__dict__",
        "mul/__globals__",
        "router",
        "obj",
        "inner/router",
        "inner/obj",
        "inner/dict",
        "inner/not_exposed",
        "nothing",
        "nothing/add",
        "",
        "/mul",
        "mul/",
        "inner//add",
        "../mul",
        "inner/../mul",
        "inner/add/__call__",
        "x" * 10_000,
    ],
)
def test_unreachable_paths_raise_lookup_error_without_touching_the_object(
    path: str,
) -> None:
    calc = Calculator()
    calc.inner.dict["not_exposed"] = not_exposed
    with pytest.raises(LookupError):
        calc.router.resolve(path)
    assert not calc.touched


def test_instance_attributes_and_exposure() -> None:
    """An instance attribute hides an exposed method of the class (and is not
    exposed itself); an exposed function stored on the instance is reachable."""

    class Service_:
        router = Service()

        @expose
        def hidden(self) -> int:
            return 1

        @expose
        @staticmethod
        def static() -> int:
            return 2

        @classmethod
        @expose
        def klass(cls) -> int:
            return 3

        handler = None  # a class attribute that is not exposed ...

    service = Service_()
    service.handler = expose(lambda: 6)  # type: ignore[assignment]  # ... hidden
    assert service.router.resolve("handler")() == 6
    service.hidden = lambda: 4  # type: ignore[method-assign]
    service.own = expose(lambda: 5)  # type: ignore[attr-defined]
    with pytest.raises(LookupError):
        service.router.resolve("hidden")
    assert service.router.resolve("static")() == 2
    assert service.router.resolve("klass")() == 3
    assert service.router.resolve("own")() == 5
    assert Service_().router.resolve("hidden")() == 1


def test_resolving_never_runs_code_of_unexposed_values() -> None:
    """Found by fuzzing: looking for the expose marker on an attribute value
    (or on one that hides an exposed method) ran that value's __getattr__."""
    looked_up: list[str] = []

    class Lazy:
        def __getattr__(self, name: str) -> Any:
            looked_up.append(name)
            raise AttributeError(name)

    class Holder:
        router = Service()

        def __init__(self) -> None:
            self.lazy_object = Lazy()
            self.shadowed = Lazy()

        @expose
        def shadowed(self) -> None:  # type: ignore[no-redef]
            pass

    holder = Holder()
    for path in ("lazy_object", "shadowed"):
        with pytest.raises(LookupError):
            holder.router.resolve(path)
    assert looked_up == []


def test_a_class_with_its_own_getattribute_is_asked_only_for_exposed_names() -> None:
    """Its __getattribute__ gives the exposed method (it may wrap it), and
    runs only once the name is known to be exposed."""
    asked: list[str] = []

    class Wrapping:
        router = Service()

        def __getattribute__(self, name: str) -> Any:
            asked.append(name)
            value = object.__getattribute__(self, name)
            if name == "echo":
                return lambda arg: ("wrapped", value(arg))
            return value

        @expose
        def echo(self, arg: Any) -> Any:
            return arg

        def secret(self) -> None:
            pass

    service = Wrapping()
    router = object.__getattribute__(service, "router")
    asked.clear()
    with pytest.raises(LookupError):
        router.resolve("secret")
    assert asked == []
    assert router.resolve("echo")(1) == ("wrapped", 1)
    assert asked == ["echo"]


def test_resolving_a_method_leaves_the_instance_dict_unmade() -> None:
    """Finding an agent's method must not make its instance __dict__ (on
    Python 3.11 and 3.12, 64 bytes per agent that was ever called)."""
    import tracemalloc

    class Slotted:
        __slots__ = ("__weakref__", "_aiomas_router")
        router = Service()

    class Agentlike(Slotted):  # (a user's subclass: it has a __dict__)
        @expose
        def ping(self) -> str:
            return "pong"

    services = [Agentlike() for _ in range(2000)]
    for service in services:
        service.state = 1  # type: ignore[attr-defined]
    routers = [service.router for service in services]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for router in routers:
            assert router.resolve("ping")() == "pong"
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / len(services) < 16  # (a made dict: 64 bytes each)
    assert services[0].state == 1  # type: ignore[attr-defined]


def test_exposed_bound_methods_and_partials_in_a_service_dict() -> None:
    class Counter:
        @expose
        def add(self, a: int, b: int) -> int:
            return a + b

        def hidden(self) -> None:
            pass

    counter = Counter()
    service = ServiceDict(
        {
            "add": counter.add,
            "hidden": counter.hidden,
            "twice": expose(functools.partial(counter.add, 2)),
        }
    )
    assert service.router.resolve("add")(1, 2) == 3
    assert service.router.resolve("twice")(5) == 7
    with pytest.raises(LookupError):
        service.router.resolve("hidden")


def test_services_put_into_a_service_dict_later_are_reachable() -> None:
    class Leaf:
        router = Service()

        @expose
        def ping(self) -> str:
            return "pong"

        @property
        def trap(self) -> None:
            raise AssertionError("no code of the value runs")

    class Plain:
        router = "not a router"

    service = ServiceDict()
    leaf, inner = Leaf(), ServiceDict({"add": expose(lambda a, b: a + b)})
    service.dict.update({"leaf": leaf, "inner": inner, "plain": Plain()})
    leaf.router.parent, leaf.router.name = service.router, "leaf"
    assert service.router.resolve("leaf/ping")() == "pong"
    assert service.router.resolve("inner/add")(1, 2) == 3
    assert leaf.router.path == "leaf"
    for path in ("plain/x", "nothing/ping", "leaf/trap"):
        with pytest.raises(LookupError):
            service.router.resolve(path)
    children = list(service.router.children())
    assert leaf.router in children
    assert inner.router in children


def test_a_class_can_be_the_service() -> None:
    class Klass:
        router = Service()

        @expose
        @staticmethod
        def static() -> int:
            return 1

        @classmethod
        @expose
        def klass(cls) -> str:
            return cls.__name__

        @staticmethod
        def hidden() -> None:
            pass

    router = Router(Klass)
    assert router.resolve("static")() == 1
    assert router.resolve("klass")() == "Klass"
    with pytest.raises(LookupError):
        router.resolve("hidden")


def test_a_half_built_service_elsewhere_does_not_stop_sending_another() -> None:
    """Before refusing to send a service, the proxy serializer attaches late
    sub-services in the whole tree; one that is not a service (yet) is skipped."""

    class Helper:
        router = Service()

    class Half:
        router = Service(["sub"])

        def __init__(self) -> None:
            self.router  # noqa: B018 (made before "sub" is filled in)
            self.sub = None

    class Root:
        router = Service(["half", "helper"])

        def __init__(self) -> None:
            self.router  # noqa: B018 (made before the sub-services exist)
            self.half = Half()
            self.helper = Helper()

    root = Root()
    root.router.attach_declared()
    assert root.helper.router.path == "helper"
    assert root.half.router.path == "half"


def test_resolve_refuses_non_string_paths() -> None:
    with pytest.raises(LookupError):
        Calculator().router.resolve(["mul"])  # type: ignore[arg-type]


def test_declared_sub_services_may_be_set_after_the_router_exists() -> None:
    class Late:
        router = Service(["child"])

        def __init__(self) -> None:
            assert self.router.path == ""  # router made before the child exists
            self.child = ServiceDict({"add": add})

    late = Late()
    assert late.router.resolve("child/add")(1, 2) == 3
    assert late.child.router.path == "child"


def test_router_add_and_set_sub_router() -> None:
    class Root:
        router = Service()

        def __init__(self) -> None:
            self.a = ServiceDict({"add": add})
            self.router.add("a")
            self.b = Calculator()
            self.router.set_sub_router(self.b.router, "bee")

    root = Root()
    assert root.router.resolve("a/add")(1, 1) == 2
    assert root.router.resolve("bee/mul")(2, 3) == 6
    assert root.router.resolve("bee/inner/add")(2, 3) == 5
    assert root.b.inner.router.path == "bee/inner"
    with pytest.raises(ValueError, match="no RPC service"):
        root.router.add("router")
    with pytest.raises(ValueError, match="'/'"):
        root.router.set_sub_router(Calculator().router, "x/y")
    with pytest.raises(LookupError):
        root.router.set_sub_router(Calculator().router, "_x")


def test_service_dict() -> None:
    sd = ServiceDict({"add": add, "sub": ServiceDict({"add": add})})
    assert sd.dict["add"] is add
    assert sd.router.resolve("sub/add")(1, 2) == 3
    assert ServiceDict().dict == {}
    assert "ServiceDict" in repr(sd)


def test_slotted_service_without_room_for_a_router() -> None:
    class Slotted:
        __slots__ = ()
        router = Service()

    with pytest.raises(TypeError, match="slot"):
        Slotted().router  # noqa: B018


def test_invalid_paths_name_their_first_bad_component() -> None:
    with pytest.raises(LookupError, match=r"component '_b' in RPC path 'a/_b/\.\.'"):
        Calculator().router.resolve("a/_b/..")
    with pytest.raises(LookupError, match="component '' in RPC path 'inner//add'"):
        Calculator().router.resolve("inner//add")


def test_router_repr_shows_path_and_object_type() -> None:
    calc = Calculator()
    assert repr(calc.router) == "<Router '' of Calculator>"
    assert repr(calc.inner.router) == "<Router 'inner' of ServiceDict>"


def test_router_of_finds_the_router_of_services_only() -> None:
    calc = Calculator()
    assert router_of(calc) is calc.router
    assert router_of(calc.inner) is calc.inner.router
    for not_a_service in (object(), {}, Calculator, type("Fake", (), {"router": 1})()):
        with pytest.raises(ValueError, match="no RPC service"):
            router_of(not_a_service)


def test_children_lists_each_attached_router_once() -> None:
    leaf = ServiceDict({"add": add})
    late = ServiceDict()
    service = ServiceDict({"leaf": leaf, "add": add})  # attached at once
    service.dict["late"] = late  # found in the dict
    service.dict["plain"] = object()  # no service
    assert list(service.router.children()) == [leaf.router, late.router]
    assert list(Router(object()).children()) == []


def test_attach_declared_visits_each_router_once() -> None:
    """A service reachable twice (or from itself) is visited once: the walk
    ends, and what is declared in it is attached."""

    class Late:
        router = Service(["child"])

        def __init__(self) -> None:
            self.router  # noqa: B018 (made before the child exists)
            self.child = ServiceDict({"add": add})

    late = Late()
    root = ServiceDict({"one": late})
    root.dict["two"] = late  # the same service under a second name
    root.dict["me"] = root  # and the dict in itself
    root.router.attach_declared()
    assert late.child.router.path == "one/child"
    assert root.router.resolve("two/child/add")(1, 2) == 3


def test_resolve_hands_only_checked_names_to_its_hooks() -> None:
    """The hooks contract: resolve() asks sub_router() for every component but
    the last and function() for the last, only once the path is valid, and a
    ``None`` from either is a LookupError."""
    asked: list[tuple[str, str]] = []

    class Recording(Router):
        __slots__ = ()

        def sub_router(self, name: str) -> Router | None:
            asked.append(("sub_router", name))
            return self if name == "again" else None

        def function(self, name: str) -> Any:
            asked.append(("function", name))
            return add if name == "add" else None

    router = Recording(object())
    assert router.resolve("again/again/add") is add
    assert asked == [
        ("sub_router", "again"),
        ("sub_router", "again"),
        ("function", "add"),
    ]
    asked.clear()
    for path in ("again/_add", "../add", "again//add", "_x/add"):
        with pytest.raises(LookupError):
            router.resolve(path)
    assert asked == []
    with pytest.raises(LookupError, match="No RPC service 'other'"):
        router.resolve("again/other/add")
    with pytest.raises(LookupError, match="No exposed function 'sub'"):
        router.resolve("again/sub")


def test_aiomas_rpc_re_exports_the_routing_names() -> None:
    for name in ("Router", "Service", "ServiceDict", "expose"):
        assert getattr(aiomas.rpc, name) is getattr(_routing, name)
        assert name in aiomas.rpc.__all__
    assert aiomas.expose is expose


def test_routing_needs_no_connection_and_no_loop() -> None:
    """The routing module imports neither asyncio nor the layers built on it."""
    imported: set[str] = set()
    source = Path(_routing.__file__).with_name("_routing.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    assert "aiomas.protocol" in imported  # (the check sees what is imported)
    forbidden = {"asyncio", "aiomas.agent", "aiomas.channel", "aiomas.rpc"}
    assert not imported & forbidden


def test_a_path_resolved_before_follows_changes_of_the_service() -> None:
    """Valid paths are split once and kept; what they lead to is looked up
    on every call, so changes of the service count at once."""

    class Spam:
        router = Service()

        @expose
        def eggs(self) -> str:
            return "eggs"

    spam = Spam()
    service = ServiceDict({"spam": spam, "ham": expose(lambda: "ham")})
    router = service.router
    for _ in range(2):  # (The second time, the path is known.)
        assert router.resolve("spam/eggs")() == "eggs"
        assert router.resolve("ham")() == "ham"
    service.dict["ham"] = expose(lambda: "new ham")
    assert router.resolve("ham")() == "new ham"
    spam.eggs = expose(lambda: "own eggs")  # type: ignore[method-assign]
    assert router.resolve("spam/eggs")() == "own eggs"
    del service.dict["ham"]
    with pytest.raises(LookupError, match="No exposed function 'ham'"):
        router.resolve("ham")
    router.set_sub_router(ServiceDict().router, "spam")  # (hides the one in dict)
    with pytest.raises(LookupError, match="No exposed function 'eggs'"):
        router.resolve("spam/eggs")


def test_invalid_paths_stay_invalid_and_the_table_of_paths_is_bounded() -> None:
    router = ServiceDict({"f": expose(lambda: 1)}).router
    for path in ("f/", "_f", "a//f", "../f"):
        for _ in range(2):
            with pytest.raises(LookupError, match="Invalid component"):
                router.resolve(path)

    for number in range(10_000):  # (Valid paths, each to nothing.)
        with pytest.raises(LookupError):
            router.resolve(f"no/{number}")
    assert len(_routing._valid_paths) <= 4096  # noqa: SLF001
    assert router.resolve("f")() == 1


def test_a_router_whose_making_failed_is_made_again_on_the_next_access() -> None:
    failures = [RuntimeError("not placed yet")]

    class Inner:
        router = Service()

        @expose
        def ping(self) -> str:
            return "pong"

    class Outer:
        router = Service(["inner"])

        def __init__(self) -> None:
            self.inner = Inner()

        def __rpc_router_made__(self, router: Router) -> None:
            if failures:
                raise failures.pop()

    outer = Outer()
    with pytest.raises(RuntimeError, match="not placed yet"):
        _ = outer.router
    router = outer.router  # (made again: this time the hook succeeds)
    assert router is outer.router
    assert router.resolve("inner/ping")() == "pong"
    assert outer.inner.router.parent is router


def test_a_str_subclass_is_resolved_as_what_it_is() -> None:
    """Only a caller in this process can pass one (the codecs decode exact
    strs): a subclass is checked every time, never looked up in the table of
    valid paths by its own hash and equality."""
    router = ServiceDict({"f": expose(lambda: "f")}).router
    assert router.resolve("f")() == "f"

    class Liar(str):
        def __hash__(self) -> int:
            return hash("f")

        def __eq__(self, other: object) -> bool:
            return True

    class Unhashable(str):
        __hash__ = None  # type: ignore[assignment]

    with pytest.raises(LookupError, match="Invalid component"):
        router.resolve(Liar("_secret"))
    assert router.resolve(Unhashable("f"))() == "f"


def test_long_paths_from_peers_are_not_kept() -> None:
    """300 calls of 100 kB paths that name nothing keep nothing."""
    router = ServiceDict({"f": expose(lambda: "f")}).router
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(300):
            path = f"{number}" + "a" * 100_000
            with pytest.raises(LookupError):
                router.resolve(path)
            del path
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, f"{kept} bytes kept after the calls"


def test_the_routing_classes_show_their_source() -> None:
    # (They keep __module__ "aiomas._routing", where they are defined, so
    # that inspect, pydoc, IPython's ?? and pdb find their source; aiomas.rpc
    # re-exports them.)
    import inspect

    for obj in (aiomas.rpc.Router, aiomas.rpc.ServiceDict, aiomas.rpc.Service):
        if aiomas.protocol.COMPILED:
            # An extension module has no source for inspect to find; the
            # compiled build ships it beside, for people to read.
            source = Path(_routing.__file__).with_name("_routing.py").read_text()
            assert f"\nclass {obj.__name__}:" in source
        else:
            assert f"class {obj.__name__}" in inspect.getsource(obj)
