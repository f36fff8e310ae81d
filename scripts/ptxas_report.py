"""Per-kernel resource report from nvcc's `-Xptxas -v` output (a build log on stdin or in the
files named): per kernel, its name, then one line with its registers, stack frame and spill
bytes for each architecture; then a summary line per architecture and the kernels that spill. Exit status 1 if the log holds no ptxas report at all
(the flag was lost), so a build that stops reporting cannot pass unnoticed.

    python scripts/ptxas_report.py build.log [more.log ...]
"""
import fileinput
import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def parse(lines):
    """{(mangled kernel, arch): {"regs", "stack", "spill_st", "spill_ld"}} in log order. ptxas
    prints, per kernel: the entry line, then its frame line, then its register line."""
    out, cur = {}, None
    for line in lines:
        if m := ENTRY.search(line):
            cur = (m.group(1), m.group(2))
            out[cur] = {}
        elif cur is not None and (m := FRAME.search(line)):
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur is not None and (m := REGS.search(line)):
            out[cur]["regs"] = int(m.group(1))
    return out


def spills(r):
    return bool(r.get("spill_st") or r.get("spill_ld"))


def demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        pretty = res.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return dict(zip(names, names))
    # "void k<T, V>(args)" -> "k<T, V>": the template arguments tell the instantiations apart.
    short = [re.sub(r"\(anonymous namespace\)::|fastbn::(cuda::)?", "", p) for p in pretty]
    short = [re.sub(r"^void |\(.*\)$", "", p) for p in short]
    return dict(zip(names, short)) if len(short) == len(names) else dict(zip(names, names))


def main(paths):
    kernels = parse(fileinput.input(paths))
    if not kernels:
        print("ptxas_report: no `-Xptxas -v` report found in the log", file=sys.stderr)
        return 1
    names = list(dict.fromkeys(k for k, _ in kernels))
    archs = sorted({a for _, a in kernels})
    pretty = demangle(names)
    for name in names:
        cols = []
        for arch in archs:
            r = kernels.get((name, arch))
            if r is not None:
                cols.append(f"{arch} {r.get('regs', '?'):>3} regs, stack {r.get('stack', 0)} B, "
                            f"spill {r.get('spill_st', 0)}/{r.get('spill_ld', 0)} B")
        print(f"{pretty[name]}\n    " + " | ".join(cols))
    for arch in archs:
        mine = [r for (_, a), r in kernels.items() if a == arch]
        regs = [r.get("regs", 0) for r in mine]
        print(f"ptxas {arch}: {len(mine)} kernels, registers {min(regs)}-{max(regs)}, "
              f"{sum(map(spills, mine))} with spills")
    for s in sorted({f"{pretty[k]} ({a})" for (k, a), r in kernels.items() if spills(r)}):
        print(f"  spills: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
