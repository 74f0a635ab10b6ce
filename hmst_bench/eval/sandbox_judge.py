"""The judge and the candidate: how a test decides pass or fail without sharing an interpreter with
the program it tests.

Inside the sandbox every job runs as two processes joined by one socket:

- the **candidate** (untrusted) executes the model-written program, then answers requests: call a
  top-level name or an object it returned, read an attribute, list an iterable, take a length;
- the **judge** (trusted) executes the benchmark's own test code (HumanEval's `check`, MBPP's
  asserts) in a namespace where each of the program's top-level names is a `Remote` proxy.

Only plain values cross the socket, as tagged JSON: None, bool, int, float, str, bytes, complex,
and lists, tuples, dicts, sets and frozensets of them. The judge rebuilds them as exact builtin
types, so every comparison the test makes is the builtins' own: an object whose `__eq__` is always
true, a rebound builtin, a trace or profile hook, a thread reading frames, anything the program does
to its own interpreter changes only what it answers, never how the answer is judged. Objects that
are not plain values stay in the candidate and travel as opaque handles (the judge can call them,
read their attributes, iterate them or pass them back; a handle equals only itself). The judge
never sees program code and the candidate never sees the test or its expected answers.

Semantics against the reference harnesses (which run one concatenated program): a result that is
a subclass of a builtin container or scalar (Counter, namedtuple, IntEnum) arrives as its builtin
base; arguments are copies, so a test that inspects an argument the candidate mutated in place sees
the original; the test's helper functions (HumanEval prompts' `poly`, `encode_cyclic`) are the
dataset's own even when the completion redefines them. HumanEval's 164 and MBPP's 500 reference
solutions all pass (tests/test_code.py).

Standard library only: this file runs in the sandbox, where nothing else is mounted.
"""

import builtins
import json
import struct
import sys

MAX_MESSAGE = 64 << 20   # bytes per message; a bigger one fails the job
_HEADER = struct.Struct("!I")
_SCALARS = (type(None), bool, int, float, str)


class CandidateError(Exception):
    """The candidate failed in a way that has no builtin exception (or broke the protocol)."""


class Channel:
    """Length-prefixed JSON messages over a connected stream socket."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, obj):
        data = json.dumps(obj).encode()
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def recv(self):
        (size,) = _HEADER.unpack(self._exactly(_HEADER.size))
        if size > MAX_MESSAGE:
            raise CandidateError(f"the candidate sent a message of {size} bytes (limit {MAX_MESSAGE})")
        try:
            return json.loads(self._exactly(size))
        except (ValueError, RecursionError):
            raise CandidateError("malformed message from the candidate") from None

    def _exactly(self, n):
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise CandidateError("the candidate process ended")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


# --- values: plain data as tagged JSON ----------------------------------------------------------
# A JSON array is always a tagged node [tag, payload]; JSON scalars are themselves.

def encode(value, to_ref):
    """Plain data as JSON; `to_ref(obj)` turns anything else into a reference node or raises."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return [{list: "l", tuple: "t", set: "s", frozenset: "f"}[kind], [encode(v, to_ref) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, to_ref), encode(v, to_ref)] for k, v in value.items()]]
    if kind is bytes or kind is bytearray:
        return ["b" if kind is bytes else "B", value.hex()]
    if kind is complex:
        return ["c", [value.real, value.imag]]
    return to_ref(value)


def decode(node, from_ref):
    """Exact builtin values from `encode`'s JSON; `from_ref(tag, payload)` resolves references."""
    if type(node) in _SCALARS:
        return node
    if type(node) is not list or len(node) != 2 or type(node[0]) is not str:
        raise CandidateError("malformed value from the candidate")
    tag, payload = node
    if tag in ("l", "t", "s", "f"):
        items = [decode(v, from_ref) for v in _array(payload)]
        return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](items)
    if tag == "d":
        return {decode(k, from_ref): decode(v, from_ref) for k, v in (_pair(p) for p in _array(payload))}
    if tag in ("b", "B") and type(payload) is str:
        return (bytes if tag == "b" else bytearray).fromhex(payload)
    if tag == "c":
        real, imag = _pair(payload)
        if type(real) is float and type(imag) is float:
            return complex(real, imag)
    return from_ref(tag, payload)


def _array(payload):
    if type(payload) is not list:
        raise CandidateError("malformed value from the candidate")
    return payload


def _pair(payload):
    if type(payload) is not list or len(payload) != 2:
        raise CandidateError("malformed value from the candidate")
    return payload


def _plain_base(value):
    """A subclass of a builtin scalar or container as that builtin (the candidate side only)."""
    for base in (bool, int, float, str, bytes, complex, list, tuple, dict, set, frozenset):
        if isinstance(value, base):
            return base(value)
    return value


# --- the candidate: runs the program, answers requests ---------------------------------------

def _flushed_send(chan, message):
    """The program's own output reaches its files before the judge hears from it: once the judge
    is done the candidate is killed, and output still in Python's buffers would be lost."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a program may have closed or replaced them
            pass
    chan.send(message)


def serve_candidate(sock, code):
    """Execute the program, report its top-level names, then answer the judge until it hangs up."""
    chan = Channel(sock)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    handles = []

    def to_ref(obj):
        base = _plain_base(obj)
        if base is not obj:
            return encode(base, to_ref)
        handles.append(obj)
        return ["h", len(handles) - 1]

    def from_ref(tag, payload):
        if tag == "h" and type(payload) is int and 0 <= payload < len(handles):
            return handles[payload]
        if tag == "n" and type(payload) is str and payload in namespace:
            return namespace[payload]
        raise CandidateError(f"unknown reference {tag}:{payload!r}")

    sys.argv = ["program.py"]
    try:
        exec(compile(code, "program.py", "exec"), namespace)
    except BaseException as exc:  # SystemExit included: a program that leaves early is not loaded
        _flushed_send(chan, ["load_error", _describe(exc)])
        return
    exports = {}
    for name, value in list(namespace.items()):
        if name.startswith("__"):
            continue
        if type(value).__name__ == "module":
            exports[name] = ["m", str(getattr(value, "__name__", ""))]
        elif callable(value):
            exports[name] = ["c"]
        else:
            try:
                exports[name] = ["v", encode(value, to_ref)]
            except BaseException:
                continue
    _flushed_send(chan, ["ready", exports])
    while True:
        try:
            request = chan.recv()
        except CandidateError:
            return  # the judge is done
        try:
            _flushed_send(chan, ["ok", encode(_answer(request, from_ref), to_ref)])
        except BaseException as exc:
            _flushed_send(chan, ["err", type(exc).__name__, _message(exc)])


def _answer(request, from_ref):
    op, ref = request[0], request[1]
    target = decode(ref, from_ref)
    if op == "call":
        args = decode(request[2], from_ref)
        kwargs = decode(request[3], from_ref)
        return target(*args, **kwargs)
    if op == "getattr":
        return getattr(target, request[2])
    if op == "setattr":
        setattr(target, request[2], decode(request[3], from_ref))
        return None
    if op == "iter":
        return list(target)
    if op == "len":
        return len(target)
    raise CandidateError(f"unknown request {op!r}")


def _message(exc):
    try:
        return str(exc)[:2000]
    except BaseException:
        return ""


def _describe(exc):
    text = _message(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the judge: runs the test against remote proxies -----------------------------------------

class Remote:
    """A name or object that lives in the candidate. Calls, attribute reads and writes (MBPP's
    setup code builds trees of the program's `Node`), iteration and len() go over the socket;
    everything else (==, hash, bool, repr) is this class's own."""

    __slots__ = ("_chan", "_ref")

    def __init__(self, chan, ref):
        object.__setattr__(self, "_chan", chan)
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return self._chan.ask(["call", self._ref, _send(args), _send(kwargs)])

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._chan.ask(["getattr", self._ref, name])

    def __setattr__(self, name, value):
        self._chan.ask(["setattr", self._ref, name, _send(value)])

    def __iter__(self):
        return iter(self._chan.ask(["iter", self._ref]))

    def __len__(self):
        return self._chan.ask(["len", self._ref])

    def __repr__(self):
        return f"<candidate object {self._ref[1]!r}>"


def _send(value):
    def to_ref(obj):
        if type(obj) is Remote:
            return obj._ref
        raise TypeError(f"cannot pass {type(obj).__name__} to the candidate (plain values only)")
    return encode(value, to_ref)


class JudgeChannel(Channel):
    def ask(self, request):
        self.send(request)
        reply = self.recv()
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return decode(reply[1], self._remote)
        if type(reply) is list and len(reply) == 3 and reply[0] == "err":
            raise _exception(reply[1], reply[2])
        raise CandidateError("malformed reply from the candidate")

    def _remote(self, tag, payload):
        if tag == "h" and type(payload) is int:
            return Remote(self, ["h", payload])
        raise CandidateError(f"malformed reference from the candidate: {tag!r}")


def _exception(name, message):
    """The candidate's exception as the builtin of that name (tests may expect ValueError...)."""
    message = str(message)
    cls = getattr(builtins, str(name), None) if type(name) is str and name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message) if message else cls()
        except Exception:
            pass
    return CandidateError(f"{name}: {message}" if message else str(name))


def run_judge(sock, setup, test, rebind):
    """Run the trusted test; returns (passed, message). Never executes program code."""
    chan = JudgeChannel(sock)
    try:
        hello = chan.recv()
        if type(hello) is list and len(hello) == 2 and hello[0] == "load_error":
            return False, str(hello[1])
        if type(hello) is not list or len(hello) != 2 or hello[0] != "ready" or type(hello[1]) is not dict:
            raise CandidateError("malformed greeting from the candidate")
        namespace = {"__name__": "__main__"}
        for name, export in hello[1].items():
            _bind(namespace, chan, name, export)
        exec(compile(setup, "test_setup.py", "exec"), namespace)
        for name in rebind:
            if type(hello[1].get(name)) is not list or hello[1][name][:1] != ["c"]:
                return False, f"NameError: the program does not define {name}"
            namespace[name] = Remote(chan, ["n", name])
        exec(compile(test, "test.py", "exec"), namespace)
    except BaseException as exc:
        return False, _describe(exc)
    return True, "passed"


def _bind(namespace, chan, name, export):
    """Bind one of the program's top-level names where the test can see it. A name that shadows a
    builtin is not bound (a program's own `abs` or `sorted` would judge its answers), and a name of
    a standard module is only ever the real module (a program's fake `math.isclose` likewise)."""
    if type(name) is not str or type(export) is not list or not export:
        raise CandidateError("malformed export from the candidate")
    if name in builtins.__dict__:
        return
    module = export[1] if export[0] == "m" and len(export) == 2 and type(export[1]) is str else name
    if module.split(".")[0] in sys.stdlib_module_names:
        if module == name or export[0] == "m":
            import importlib

            try:
                namespace[name] = importlib.import_module(module)
            except ImportError:
                pass
        return
    if export[0] == "c":
        namespace[name] = Remote(chan, ["n", name])
    elif export[0] == "v" and len(export) == 2:
        namespace[name] = decode(export[1], chan._remote)
