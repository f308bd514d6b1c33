"""Reading a compiled program's HLO text: its collectives, and the bytes it moves through HBM per run.

XLA's `cost_analysis()` is not enough for either question on TPU: it counts a loop body once (a scanned
36-layer model shows one layer), and its "bytes accessed" counts every access of every fusion, including
the weights the TPU compiler prefetched into on-chip VMEM (a prefetched weight counts three times: read
from HBM, written to VMEM, read again). `hbm_bytes` walks the program instead:

- top-level instructions of the entry computation, loop bodies and conditional branches (not the inside
  of fusions), each costing its operands read and its result written, where they live in HBM: a layout
  with memory space `S(1)` (VMEM) costs nothing, an async copy into VMEM costs its HBM read once;
- a fused operand that the fusion only slices (`dynamic-slice`, `slice`, `gather`, possibly after layout
  copies, bitcasts or converts) costs the slice; a fusion that updates a buffer in place
  (`dynamic-update-slice` root) costs the update;
- a `while` body costs its trip count (the constant bound in its condition) times one run; a
  `conditional` costs its costlier branch (the worst case: e.g. every expert slot of a decode step taken).

It is an estimate from the program's structure (it does not model caches or re-reads inside a fusion), made to
compare a compiled step against the bytes it must read (`plan.decode_reads`).
"""

from __future__ import annotations

import math
import re
from typing import Any

_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
         "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8,
         "f8e4m3": 8, "f8e5m2fnuz": 8, "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8, "f8e3m4": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(all-reduce|all-gather|all-to-all|reduce-scatter|"
                         r"collective-permute|ragged-all-to-all|collective-broadcast)(-start)?\(", re.M)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "call", "copy-done", "slice-done",
         "after-all", "partition-id", "replica-id", "opt-barrier"}
_SLICES = {"dynamic-slice", "slice", "gather"}
_PASS_THROUGH = {"bitcast", "copy", "convert"}


def _arrays(type_text: str) -> list[tuple[int, int, bool]]:
    """(elements, bytes, in VMEM) of each array in an HLO type (a tuple has several)."""
    out = []
    for kind, dims, layout in _ARRAY.findall(type_text):
        if kind in _BITS:
            n = math.prod(int(d) for d in dims.split(",") if d)
            out.append((n, n * _BITS[kind] // 8, "S(1)" in layout))
    return out


def _hbm(type_text: str) -> int:
    return sum(b for _, b, vmem in _arrays(type_text) if not vmem)


def parse_collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """kind -> (count, bytes of the results on one device) of the collectives in compiled HLO text.

    An async `-start` op's result is a tuple (operands, results[, context]): its results are counted."""
    out: dict[str, tuple[int, int]] = {}
    for shape, kind, start in _COLLECTIVE.findall(hlo_text):
        arrays = [(t, d) for t, d, _ in _ARRAY.findall(shape) if t in _BITS]
        if start:
            arrays = [(t, d) for t, d in arrays if d]  # scalars in an async tuple are its context
            if kind != "all-reduce" and len(arrays) >= 2:
                arrays = arrays[len(arrays) // 2:]
        nbytes = sum(math.prod(int(n) for n in d.split(",") if n) * _BITS[t] // 8 for t, d in arrays)
        count, total = out.get(kind, (0, 0))
        out[kind] = (count + 1, total + nbytes)
    return out


def _parse(hlo_text: str) -> dict[str, list[dict[str, Any]]]:
    """computation name -> its instructions (name, type, op, operand names, raw operand text, attributes)."""
    comps: dict[str, list[dict[str, Any]]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = comps.setdefault(head.group(1), [])
            continue
        m = _INSTR.match(line)
        if m is None or current is None:
            continue
        name, type_text, op, rest = m.groups()
        depth, i = 1, 0
        while i < len(rest) and depth:  # the operand list ends at the matching parenthesis
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        raw = rest[:i - 1]
        current.append({"name": name, "type": type_text, "op": op, "raw": raw, "attrs": rest[i:],
                        "args": re.findall(r"%([\w.\-]+)", raw)})
    return comps


def _users(body: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    users: dict[str, list[dict[str, Any]]] = {}
    for j in body:
        for a in j["args"]:
            users.setdefault(a, []).append(j)
    return users


def _param(body: list[dict[str, Any]], index: int) -> dict[str, Any] | None:
    return next((j for j in body if j["op"] == "parameter" and j["raw"].strip() == str(index)), None)


def _sliced_elems(node: dict[str, Any], body: list[dict[str, Any]], comps: dict[str, list[dict[str, Any]]]) -> int | None:
    """Elements of a fused value that its fusion reads when it only reads slices of it (through layout copies,
    bitcasts, converts, nested fusions), else None (all of it is read)."""
    users, total, frontier = _users(body), 0, [node]
    while frontier:
        node = frontier.pop()
        uses = users.get(node["name"], [])
        if not uses:
            return None
        for u in uses:
            if u["op"] == "dynamic-update-slice" and u["args"][0] == node["name"]:
                continue  # written in place: the update is counted where the fusion's root writes it
            if u["op"] in _SLICES and u["args"] and u["args"][0] == node["name"]:
                total += sum(n for n, _, _ in _arrays(u["type"]))
            elif u["op"] in _PASS_THROUGH or (u["op"] == "fusion" and "output_to_operand_aliasing" in u["attrs"]):
                frontier.append(u)
            elif u["op"] == "fusion" and u["args"].count(node["name"]) == 1:
                inner = comps.get(re.search(r"calls=%?([\w.\-]+)", u["attrs"]).group(1), [])
                param = _param(inner, u["args"].index(node["name"]))
                n = None if param is None else _sliced_elems(param, inner, comps)
                if n is None:
                    return None
                total += n
            else:
                return None
    return total


def _fusion_bytes(ins: dict[str, Any], operands: list[str], body: list[dict[str, Any]],
                  comps: dict[str, list[dict[str, Any]]]) -> float:
    users = _users(body)
    total = 0.0
    for j in body:
        if j["op"] != "parameter" or not j["raw"].strip().isdigit() or int(j["raw"]) >= len(operands):
            continue
        operand = operands[int(j["raw"])]
        uses = users.get(j["name"], [])
        sliced = _sliced_elems(j, body, comps)
        if sliced is not None:
            total += sliced * _hbm(operand) / max(sum(n for n, _, _ in _arrays(operand)), 1)
        elif not (uses and all(u["op"] == "dynamic-update-slice" and u["args"][0] == j["name"] for u in uses)):
            total += _hbm(operand)  # (a buffer updated in place costs only its update, below)
    root = body[-1]
    if root["op"] == "dynamic-update-slice" and _hbm(ins["type"]):
        update = next((j for j in body if j["name"] == root["args"][1]), None)
        total += _hbm(update["type"]) if update else 0
    else:
        total += _hbm(ins["type"])
    return total


def hbm_bytes(hlo_text: str) -> float:
    """Bytes one run of a compiled program reads and writes in HBM, per device (see the module docstring)."""
    comps = _parse(hlo_text)
    types = {(c, i["name"]): i["type"] for c, body in comps.items() for i in body}
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.M)
    if entry is None:
        raise ValueError("hbm_bytes: no ENTRY computation in the HLO text")

    def run(c: str) -> float:
        total = 0.0
        for ins in comps[c]:
            op, operands = ins["op"], [types.get((c, a), "") for a in ins["args"]]
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins["attrs"]).group(1)
                cond = re.search(r"condition=%?([\w.\-]+)", ins["attrs"]).group(1)
                bounds = [int(j["raw"]) for j in comps[cond] if j["op"] == "constant" and j["raw"].strip().isdigit()]
                total += (max(bounds) if bounds else 1) * run(body)
            elif op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", ins["attrs"])
                names = ([b.strip().lstrip("%") for b in m.group(1).split(",")] if m else
                         re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", ins["attrs"]))
                total += max(run(b) for b in names)
            elif op == "fusion":
                total += _fusion_bytes(ins, operands, comps[re.search(r"calls=%?([\w.\-]+)", ins["attrs"]).group(1)], comps)
            elif op == "copy-start":
                total += _hbm(operands[0]) if operands else 0
            elif op == "slice-start":
                arrays = _arrays(ins["type"])
                total += arrays[1][1] if len(arrays) > 1 else 0
            elif op == "dynamic-update-slice":
                total += 2 * _hbm(operands[1])
            elif op not in _FREE:
                total += sum(_hbm(t) for t in operands) + _hbm(ins["type"])
        return total

    return run(entry.group(1))
