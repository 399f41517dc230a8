"""FLOPs and memory traffic of a compiled XLA program, read from its optimised HLO text
(`compiled.as_text()`), every loop counted as many times as it runs (docs/benchmarks.md,
"FLOPs, roofline time and MFU").

XLA's own `cost_analysis()` counts a while loop's body once, so a program of scans (the
rollout's steps, the update's micro batches and terms, layers under `lax.scan`) is undercounted
by their trip counts, and it counts no custom kernel (the TPU splash attention is a Pallas
custom call). This walker counts, per execution of the program on one device:

- `flops`: the matrix units' work, 2 x output elements x contracted size of each dot and
  convolution (and of the GPU's cuBLAS / cuDNN convolution custom calls); elementwise work is
  not counted. Fusions count what they fuse, a call its callee, a while loop its body and
  condition times its trip count, a conditional its costliest branch;
- `kernel_flops`: the custom kernels of `KERNELS` (the splash attention's forward, dq and dkv
  kernels), from their q and k operand shapes as the kernel computes them (lengths padded to
  the kernel's multiple of 128). Other custom calls are named in `unknown_kernels`;
- `recompute_flops`: the part of both inside `jax.checkpoint`'s recomputation in the backward
  pass (instructions whose op_name holds "rematted_computation");
- `bytes`: an estimate of the memory (HBM) traffic: operands plus outputs of every
  instruction outside fusions (a fusion at its boundary), leaving out buffers XLA placed in
  another memory space (`S(n)` in their layout: a TPU's on-chip memories, or the host); a
  slice of an operand counts the slice, an in-place update its update, an asynchronous start
  what it adds to its operands; loops times their trip counts.

A while loop's trip count is the `known_trip_count` XLA writes into its backend config (CPU and
GPU pipelines); the TPU pipeline leaves it out, so there the loop is run on the integer values
its condition reads (constants, the loop's initial tuple, values enclosing loops keep
invariant). A loop whose count depends on data is an error naming it.
"""
import dataclasses
import math
import re

# Bytes per element of each HLO type (f8 types: 1).
_ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                  "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                  "f64": 8, "c64": 8, "c128": 16, "token": 0}
# Matrix products per (query, key) pair and head dimension, 2 FLOPs each, of the splash
# attention kernels (jax.experimental.pallas.ops.tpu.splash_attention), found by kernel name:
# forward: logits, probabilities x values; dq: logits, dP, dQ; dkv: logits, dV, dP, dK (and
# dQ when the backward is one fused kernel, which then has three gradient outputs).
KERNELS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")
_RECOMPUTED = "rematted_computation"  # jax.checkpoint's name scope of the recomputation
# Instructions that move no data of their own.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota"}
# Custom calls that compute nothing (TPU buffer bookkeeping and annotations, collectives);
# the first three move no data either.
_BUFFER_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}
_NO_FLOP_CALLS = _BUFFER_CALLS | {"AsyncCollectiveStart", "AsyncCollectiveDone", "Sharding",
                                  "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost",
                                  "MoveToDevice"}
# GPU convolution custom calls (dim_labels and window of the forward convolution): where the
# forward's input, filter and output are (("in", 1): operand 1, ("out", 0): the first output).
_CUDNN_CONVOLUTIONS = {
    "__cudnn$convForward": (("in", 0), ("in", 1), ("out", 0)),
    "__cudnn$convBiasActivationForward": (("in", 0), ("in", 1), ("out", 0)),
    "__cudnn$convBackwardInput": (("out", 0), ("in", 1), ("in", 0)),
    "__cudnn$convBackwardFilter": (("in", 0), ("out", 0), ("in", 1))}
_SLICE_READS = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_MAX_TRIPS = 10_000_000

_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?")
_ARRAY_TEXT = re.compile(r"([a-z][a-z0-9]*\[[^\]]*\])(\{[^}]*\})?")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")


class HloCostError(ValueError):
    """A program the walker cannot count; the message names the instruction."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """One execution of a program on one device."""

    flops: float = 0.0
    kernel_flops: float = 0.0
    recompute_flops: float = 0.0
    bytes: float = 0.0
    unknown_kernels: tuple = ()

    @property
    def hardware_flops(self) -> float:
        """What the device executes: XLA's matrix ops and the known kernels, recompute included."""
        return self.flops + self.kernel_flops

    @property
    def model_flops(self) -> float:
        """The hardware FLOPs without the rematerialisation's recompute (docs/benchmarks.md)."""
        return self.hardware_flops - self.recompute_flops

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.kernel_flops + other.kernel_flops,
                    self.recompute_flops + other.recompute_flops, self.bytes + other.bytes,
                    tuple(sorted(set(self.unknown_kernels) | set(other.unknown_kernels))))

    def times(self, n: int) -> "Cost":
        return Cost(self.flops * n, self.kernel_flops * n, self.recompute_flops * n,
                    self.bytes * n, self.unknown_kernels)


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: list
    attributes: str
    root: bool

    def attribute(self, key: str) -> str | None:
        found = re.search(rf"\b{key}=%?([^\s,}}]+)", self.attributes)
        return found.group(1) if found else None

    def dims(self, key: str) -> list[int]:
        found = re.search(rf"\b{key}=\{{([\d,]*)\}}", self.attributes)
        return [int(d) for d in found.group(1).split(",") if d] if found else []

    @property
    def target(self) -> str:
        found = re.search(r'custom_call_target="([^"]*)"', self.attributes)
        return found.group(1) if found else ""

    @property
    def recomputed(self) -> bool:
        return _RECOMPUTED in self.attributes


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(element type, dims) of each array of an HLO shape, a tuple's in order."""
    return [(dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d))
            for dtype, dims, _ in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
    """Bytes of the arrays of an HLO shape that live in device memory (no `S(n)` memory space
    in their layout)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in _ELEMENT_BYTES and not dtype.startswith("f8"):
            raise HloCostError(f"unknown HLO element type {dtype!r} in {shape!r}")
        if "S(" not in layout:
            total += _ELEMENT_BYTES.get(dtype, 1) * math.prod(
                int(d.lstrip("<=")) for d in dims.split(",") if d)
    return total


def _closing(text: str, start: int) -> int:
    """The index just past the bracket that closes text[start]."""
    pairs, depth = {"(": ")", "{": "}"}, 0
    for i in range(start, len(text)):
        depth += (text[i] == text[start]) - (text[i] == pairs[text[start]])
        if depth == 0:
            return i + 1
    raise HloCostError(f"unbalanced {text[start]!r} in the HLO text at {text[start:start + 80]!r}")


def _parse_instruction(line: str) -> _Instruction:
    matched = _INSTRUCTION.match(line)
    root, name, rest = bool(matched.group(1)), matched.group(2), matched.group(3)
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:]
    opcode = _OPCODE.match(rest)
    if not opcode:
        raise HloCostError(f"cannot read the HLO instruction {line.strip()[:120]!r}")
    close = _closing(rest, opcode.end() - 1)
    inside = rest[opcode.end():close - 1]
    operands = re.findall(r"%([^\s,)]+)", inside) if "%" in inside else [inside.strip()]
    return _Instruction(name, shape, opcode.group(1), operands, rest[close:], root)


def parse(text: str) -> tuple[dict, str]:
    """{computation: {instruction name: _Instruction}} and the entry computation's name."""
    computations, entry, current, lines = {}, None, None, []

    def flush():
        if lines:
            instruction = _parse_instruction(" ".join(lines))
            current[instruction.name] = instruction
            lines.clear()

    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = computations.setdefault(header.group(2), {})
                entry = header.group(2) if header.group(1) else entry
        elif line.strip() == "}":
            flush()
            current = None
        elif _INSTRUCTION.match(line):
            flush()
            lines.append(line)
        elif lines:
            lines.append(line.strip())  # an instruction's attributes, continued
    if entry is None:
        raise HloCostError("no ENTRY computation in the HLO text")
    return computations, entry


def _called(ins: _Instruction) -> list[str]:
    """The computations an instruction runs (not the scalar functions of reduce, sort, ...)."""
    if ins.opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attributes)
        if branches:
            return re.findall(r"%?([^\s,]+)", branches.group(1))
        return [ins.attribute("true_computation"), ins.attribute("false_computation")]
    if ins.opcode == "call":
        return [ins.attribute("to_apply")]
    if ins.opcode == "fusion" or ins.opcode.endswith("-start"):
        return [ins.attribute("calls")] if ins.attribute("calls") else []
    return []


class Program:
    """A compiled program's HLO text; `cost()` is one execution's."""

    def __init__(self, text: str):
        self.computations, self.entry = parse(text)
        self._fused = {}

    def root(self, computation: str) -> _Instruction:
        return next(i for i in self.computations[computation].values() if i.root)

    def cost(self) -> Cost:
        return self._cost(self.entry, _Frame(self, self.entry, None))

    def _cost(self, computation: str, frame: "_Frame") -> Cost:
        total = Cost()
        for ins in self.computations[computation].values():
            total += self._instruction_cost(computation, ins, frame)
        return total

    def _instruction_cost(self, computation: str, ins: _Instruction, frame: "_Frame") -> Cost:
        if ins.opcode == "while":
            body, condition = ins.attribute("body"), ins.attribute("condition")
            state = _LoopState(self, frame, ins)
            return (self._cost(body, _Frame(self, body, state))
                    + self._cost(condition, _Frame(self, condition, state))).times(
                self.trip_count(ins, frame))
        if ins.opcode == "conditional":
            branches = [self._cost(c, _Frame(self, c, None)) for c in _called(ins)]
            return max(branches, key=lambda c: (c.hardware_flops, c.bytes))
        if ins.opcode == "call":
            callee = _called(ins)[0]
            return self._cost(callee, _Frame(self, callee, _Operands(frame, ins)))
        work = self._op_cost(computation, ins)
        for called in _called(ins):
            work += self._fused_cost(called)
        return dataclasses.replace(work, bytes=self._bytes(computation, ins))

    # ---- FLOPs

    def _fused_cost(self, computation: str) -> Cost:
        if computation not in self._fused:
            total = Cost()
            for ins in self.computations[computation].values():
                total += self._op_cost(computation, ins)
                for called in _called(ins):
                    total += self._fused_cost(called)
            self._fused[computation] = total
        return self._fused[computation]

    def _shape(self, computation: str, name: str) -> tuple[int, ...]:
        return arrays(self.computations[computation][name].shape)[0][1]

    def _op_cost(self, computation: str, ins: _Instruction) -> Cost:
        flops, kernel, unknown = 0.0, 0.0, ()
        if ins.opcode == "dot":
            lhs = self._shape(computation, ins.operands[0])
            contracted = math.prod(lhs[d] for d in ins.dims("lhs_contracting_dims"))
            flops = 2.0 * math.prod(arrays(ins.shape)[0][1]) * contracted
        elif ins.opcode == "convolution":
            flops = _convolution_flops(ins, self._shape(computation, ins.operands[0]),
                                       self._shape(computation, ins.operands[1]),
                                       arrays(ins.shape)[0][1])
        elif ins.opcode == "custom-call":
            flops, kernel, unknown = self._custom_call_flops(computation, ins)
        recompute = flops + kernel if ins.recomputed else 0.0
        return Cost(flops, kernel, recompute, 0.0, unknown)

    def _custom_call_flops(self, computation: str, ins: _Instruction) -> tuple:
        target = ins.target
        if target in _NO_FLOP_CALLS:
            return 0.0, 0.0, ()
        contracting = re.search(r'"lhs_contracting_dimensions":\["?([\d"," ]*)\]', ins.attributes)
        if "gemm_backend_config" in ins.attributes and contracting:  # cuBLAS (GPU)
            lhs = self._shape(computation, ins.operands[0])
            dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))]
            return 2.0 * math.prod(arrays(ins.shape)[0][1]) * math.prod(lhs[d] for d in dims), 0.0, ()
        if target in _CUDNN_CONVOLUTIONS:
            shapes = {"out": [dims for _, dims in arrays(ins.shape)],
                      "in": [self._shape(computation, name) for name in ins.operands]}
            lhs, kernel, output = (shapes[side][i] for side, i in _CUDNN_CONVOLUTIONS[target])
            return _convolution_flops(ins, lhs, kernel, output), 0.0, ()
        kind = _SPLASH.search(ins.name) or _SPLASH.search(ins.attributes)
        if not kind:
            return 0.0, 0.0, (target,)
        # q (..., q_len, head_dim) and k (..., kv_len, head_dim): the kernel's first two
        # floating-point operands of rank 3 or more (v, the residuals and dO follow).
        q, k = [dims for name in ins.operands
                for dtype, dims in arrays(self.computations[computation][name].shape)
                if dtype.startswith(("f", "bf")) and len(dims) >= 3][:2]
        products = KERNELS[kind.group(1)]
        if kind.group(1) == "dkv" and len([d for _, d in arrays(ins.shape) if len(d) >= 4]) >= 3:
            products += 1  # the fused backward: dQ too
        return 0.0, 2.0 * products * math.prod(q) * k[-2], ()

    # ---- bytes

    def _bytes(self, computation: str, ins: _Instruction) -> float:
        if (ins.opcode in _NO_TRAFFIC or ins.opcode.endswith(("-done", "-update"))
                or ins.target in _BUFFER_CALLS):
            return 0.0
        shapes = self.computations[computation]
        if ins.opcode.endswith("-start"):
            return _async_bytes(ins, shapes)
        fused = ins.attribute("calls") if ins.opcode == "fusion" else None
        reads = self._fusion_reads(fused) if fused else _unfused_reads(ins)
        read = 0.0
        for position, name in enumerate(ins.operands):
            if name in shapes:
                whole = shape_bytes(shapes[name].shape)
                read += min(reads.get(position, whole), whole)
        return read + (self._fusion_writes(fused) if fused else _unfused_writes(ins, shapes))

    def _fusion_reads(self, computation: str) -> dict:
        """{parameter number: bytes read} for parameters that the fusion only slices or
        updates in place; the others are read whole."""
        body = self.computations[computation]
        users = {name: [] for name in body}
        for ins in body.values():
            for position, name in enumerate(ins.operands):
                if name in users:
                    users[name].append((ins, position))
        reads = {}
        for ins in body.values():
            if ins.opcode != "parameter":
                continue
            uses = list(_through_bitcasts(ins.name, users))
            if uses and all(position == 0 and user.opcode in _SLICE_READS | _IN_PLACE
                            for user, position in uses):
                reads[int(ins.operands[0])] = sum(shape_bytes(user.shape) for user, _ in uses
                                                  if user.opcode in _SLICE_READS)
        return reads

    def _fusion_writes(self, computation: str) -> float:
        body = self.computations[computation]
        root = self.root(computation)
        total = 0.0
        for out in ([body[n] for n in root.operands] if root.opcode == "tuple" else [root]):
            while out.opcode == "bitcast":
                out = body[out.operands[0]]
            total += _unfused_writes(out, body)
        return total

    # ---- loops

    def trip_count(self, ins: _Instruction, frame: "_Frame") -> int:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attributes)
        return int(known.group(1)) if known else self.run_trip_count(ins, frame)

    def run_trip_count(self, ins: _Instruction, frame: "_Frame") -> int:
        """The loop run on the integer values its condition reads: the state elements it
        reads, and those their updates read, from the loop's initial tuple."""
        body, condition = ins.attribute("body"), ins.attribute("condition")
        update, initial, state, trips = self.root(body), None, {}, 0

        def element(index):
            nonlocal initial
            if index not in state:
                if trips:
                    raise _NotConstant(f"element {index} of its state")
                initial = initial or frame.value(ins.operands[0])
                state[index] = initial.element(index)
            return state[index]

        try:
            while _Frame(self, condition, _State(element)).value(self.root(condition).name):
                step, count = _Frame(self, body, _State(element)), -1
                while count != len(state):  # until the updates read no new element
                    count = len(state)
                    updated = {k: step.value(update.operands[k]) for k in list(state)}
                state.update(updated)
                trips += 1
                if trips > _MAX_TRIPS:
                    raise _NotConstant(f"over {_MAX_TRIPS} iterations")
        except _NotConstant as e:
            raise HloCostError(f"cannot count the trips of while loop %{ins.name}: its trip count "
                               f"is not in the HLO and depends on {e}") from None
        return trips


def _convolution_flops(ins: _Instruction, lhs: tuple, kernel: tuple, output: tuple) -> float:
    """2 x (output elements / output positions) x kernel input features x the (output position,
    kernel tap) pairs that fall on the input rather than its padding (a TPU writes batched
    matmuls as convolutions padded this way)."""
    lhs_labels, rest = ins.attribute("dim_labels").split("_")
    kernel_labels, output_labels = rest.split("->")
    pairs, positions = 1, 1
    for d, window in enumerate(_window(ins)):
        size_in, size_out = lhs[lhs_labels.index(str(d))], output[output_labels.index(str(d))]
        pairs *= _valid_pairs(size_in, size_out, **window)
        positions *= size_out
    return 2.0 * math.prod(output) / positions * kernel[kernel_labels.index("i")] * pairs


def _window(ins: _Instruction) -> list[dict]:
    """Per spatial dimension: size, stride, pad_low, lhs_dilate, rhs_dilate."""
    found = re.search(r"window=\{([^}]*)\}", ins.attributes)
    fields = dict(f.split("=") for f in found.group(1).split()) if found else {}
    split = lambda key: fields[key].split("x") if key in fields else None
    sizes = split("size") or []
    column = lambda key, default: split(key) or [default] * len(sizes)
    return [dict(size=int(size), stride=int(stride), pad_low=int(pad.split("_")[0]),
                 lhs_dilate=int(lhs), rhs_dilate=int(rhs))
            for size, stride, pad, lhs, rhs in zip(sizes, column("stride", "1"),
                                                   column("pad", "0_0"), column("lhs_dilate", "1"),
                                                   column("rhs_dilate", "1"))]


def _valid_pairs(size_in, size_out, *, size, stride, pad_low, lhs_dilate, rhs_dilate) -> int:
    """(output position, kernel tap) pairs of one dimension whose input position is a real
    (not padding, not dilation hole) input element."""
    extent, count = (size_in - 1) * lhs_dilate + 1, 0
    for tap in range(size):
        offset = tap * rhs_dilate - pad_low  # input position = o * stride + offset
        if lhs_dilate == 1:
            first = max(0, -(offset // stride))  # ceil(-offset / stride)
            last = min(size_out - 1, (extent - 1 - offset) // stride)
            count += max(0, last - first + 1)
        else:
            count += sum(1 for o in range(size_out) if 0 <= o * stride + offset < extent
                         and (o * stride + offset) % lhs_dilate == 0)
    return count


def _async_bytes(ins: _Instruction, shapes: dict) -> float:
    """An asynchronous start (copy-start, slice-start, all-gather-start, ...): its output tuple
    repeats its operands beside its results; it reads its operands (a slice: the slice) and
    writes its results."""
    operands = [shapes[name].shape for name in ins.operands if name in shapes]
    results = ["".join(array) for array in _ARRAY_TEXT.findall(ins.shape)]
    for operand in operands:
        for array in _ARRAY_TEXT.findall(operand):
            if "".join(array) in results:
                results.remove("".join(array))
    written = sum(shape_bytes(r) for r in results)
    if ins.opcode[:-len("-start")] in _SLICE_READS:
        return 2 * written if written else sum(  # the slice, to device or on-chip memory
            _ELEMENT_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in arrays(results[0]))
    return sum(shape_bytes(o) for o in operands) + written


def _unfused_reads(ins: _Instruction) -> dict:
    if ins.opcode in _SLICE_READS:
        return {0: shape_bytes(ins.shape)}
    if ins.opcode in _IN_PLACE:
        return {0: 0.0}
    return {}


def _unfused_writes(ins: _Instruction, shapes: dict) -> float:
    """Output bytes; an in-place update writes its update only."""
    if ins.opcode == "dynamic-update-slice":
        return shape_bytes(shapes[ins.operands[1]].shape)
    if ins.opcode == "scatter":
        return shape_bytes(shapes[ins.operands[-1]].shape)
    return shape_bytes(ins.shape)


def _through_bitcasts(name: str, users: dict):
    for user, position in users[name]:
        if user.opcode == "bitcast":
            yield from _through_bitcasts(user.name, users)
        else:
            yield user, position


class _NotConstant(Exception):
    """A value the trip-count evaluator cannot know when the program compiles."""


class _Tuple:
    """A tuple value whose elements are evaluated when read."""

    def __init__(self, element):
        self.element = element


class _State:
    """A loop's state while its trip count is run: element(index) -> value."""

    def __init__(self, element):
        self.element = element


class _LoopState:
    """A while body's state when its cost is counted: an element the body passes through
    unchanged has the loop's initial value."""

    def __init__(self, program: Program, frame: "_Frame", loop: _Instruction):
        self.program, self.frame, self.loop = program, frame, loop

    def element(self, index: int):
        body = self.program.computations[self.loop.attribute("body")]
        root = self.program.root(self.loop.attribute("body"))
        passed = body[root.operands[index]] if root.opcode == "tuple" else root
        while passed.opcode in ("copy", "bitcast"):
            passed = body[passed.operands[0]]
        if not (passed.opcode == "get-tuple-element" and passed.attribute("index") == str(index)
                and body[passed.operands[0]].opcode == "parameter"):
            raise _NotConstant(f"element {index} of the state of %{self.loop.name}, which changes")
        return self.frame.value(self.loop.operands[0]).element(index)


class _Operands:
    """A called computation's parameters: its caller's operands."""

    def __init__(self, frame: "_Frame", call: _Instruction):
        self.frame, self.call = frame, call


class _Frame:
    """Integer values of a computation's scalar instructions; its parameters come from
    `parameters` (_State / _LoopState: a loop's state; _Operands: a caller's; None: the entry)."""

    _BINARY = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b,
               "multiply": lambda a, b: a * b, "maximum": max, "minimum": min,
               "divide": lambda a, b: int(a / b), "remainder": lambda a, b: int(math.fmod(a, b)),
               "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b}
    _COMPARE = {"LT": lambda a, b: a < b, "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b,
                "GE": lambda a, b: a >= b, "EQ": lambda a, b: a == b, "NE": lambda a, b: a != b}

    def __init__(self, program: Program, computation: str, parameters):
        self.program, self.computation, self.parameters = program, computation, parameters
        self.values = {}

    def value(self, name: str):
        if name not in self.values:
            self.values[name] = self._evaluate(self.program.computations[self.computation][name])
        return self.values[name]

    def _evaluate(self, ins: _Instruction):
        op, args = ins.opcode, ins.operands
        if op == "parameter":
            if isinstance(self.parameters, _Operands):
                return self.parameters.frame.value(self.parameters.call.operands[int(args[0])])
            if self.parameters is None:
                raise _NotConstant(f"parameter %{ins.name} of the entry computation")
            return _Tuple(self.parameters.element)
        if op == "get-tuple-element":
            return self.value(args[0]).element(int(ins.attribute("index")))
        if op == "tuple":
            return _Tuple(lambda i: self.value(args[i]))
        if any(math.prod(dims) != 1 for _, dims in arrays(ins.shape)):
            raise _NotConstant(f"the array %{ins.name}")
        if op == "constant":
            literal = args[0].strip("{} ")
            return literal == "true" if literal in ("true", "false") else int(float(literal))
        if op in ("copy", "bitcast", "convert", "reshape"):
            return self.value(args[0])
        if op in self._BINARY:
            return self._BINARY[op](self.value(args[0]), self.value(args[1]))
        if op == "compare":
            return self._COMPARE[ins.attribute("direction")](self.value(args[0]), self.value(args[1]))
        if op == "negate":
            return -self.value(args[0])
        if op == "not":
            value = self.value(args[0])
            return not value if isinstance(value, bool) else ~value
        if op == "select":
            chosen, on_true, on_false = (self.value(a) for a in args)
            return on_true if chosen else on_false
        if op in ("fusion", "call"):
            callee = _called(ins)[0]
            return _Frame(self.program, callee, _Operands(self, ins)).value(
                self.program.root(callee).name)
        raise _NotConstant(f"%{ins.name} ({op})")


def program_cost(text: str) -> Cost:
    """The cost of one execution of the program whose optimised HLO text is `text`."""
    return Program(text).cost()
