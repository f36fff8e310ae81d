"""Builds fastbn's CUDA kernels for the CPU emulator with g++ (no nvcc, no GPU).

Two products, each in three flavours:
  module  the Python extension ``fastbn_cuda_emu``: fastbn's CUDA backend (the real binding
          code, csrc/cuda/cuda_backend.h) over the emulated kernels, on CPU tensors;
  driver  a torch-free C++ program (src/driver.cpp) that runs every launcher.
Flavours: ``plain``; ``asan`` (AddressSanitizer + UndefinedBehaviorSanitizer, aborting on the
first report); ``tsan`` (ThreadSanitizer on the kernels, driver only: TSan cannot run inside
Python). ``src_root`` may point at a modified copy of csrc/ (the seeded-bug test does that).

Objects are cached under build/cuda_emu/ by a hash of the flags and of every file they
depend on, so a rebuild after a change recompiles only what the change touches.

    python tests/cuda_emu/emu_build.py module --flavor asan      # prints the built path
"""
import argparse
import concurrent.futures
import glob
import hashlib
import os
import re
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO, "csrc")
EMU_INCLUDE = os.path.join(HERE, "include")
EMU_SRC = os.path.join(HERE, "src")
BUILD = os.path.join(REPO, "build", "cuda_emu")
MODULE_NAME = "fastbn_cuda_emu"
CXX = os.environ.get("CXX", "g++")

COMMON = ["-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
          "-Wno-unused-function", "-pthread"]
FLAVOURS = {
    # (flags for kernels and the driver, flags for the runtime, link flags)
    "plain": (["-O2"], ["-O2"], []),
    "asan": (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
             ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
             ["-fsanitize=address,undefined"]),
    # The runtime stays uninstrumented: it annotates fiber switches and barriers for TSan itself.
    "tsan": (["-O1", "-g", "-fsanitize=thread"], ["-O1", "-g", "-DCUDA_EMU_TSAN"], ["-fsanitize=thread"]),
}


def _files(*patterns):
    out = []
    for p in patterns:
        out += sorted(glob.glob(p))
    return out


def _digest(flags, paths, src_root=CSRC):
    """Key of an object: flags and the names and contents of its files, not where the source
    tree lies, so a modified copy of csrc/ shares every object its change does not touch."""
    h = hashlib.sha1()
    h.update(" ".join(flags).replace(src_root, "<csrc>").encode())
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _compile(job):
    src, obj, flags = job
    if os.path.exists(obj):
        return obj, None
    tmp = obj + ".tmp"
    lang = ["-x", "c++"] if src.endswith(".cu") else []
    cmd = [CXX] + flags + ["-c"] + lang + [src, "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return obj, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    os.replace(tmp, obj)
    return obj, None


def _build_objects(jobs, src_root=CSRC):
    """jobs: (source, flags, dependency paths). Returns the object paths (compiling the stale)."""
    obj_dir = os.path.join(BUILD, "obj")  # every flavour: the key covers the flags
    os.makedirs(obj_dir, exist_ok=True)
    planned = []
    for src, flags, deps in jobs:
        key = _digest(flags + [CXX], [src] + deps, src_root)
        name = os.path.basename(src).replace(".", "_")
        planned.append((src, os.path.join(obj_dir, f"{name}-{key}.o"), flags))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        results = list(ex.map(_compile, planned))
    errors = [e for _, e in results if e]
    if errors:
        raise RuntimeError("cuda_emu build failed:\n" + "\n\n".join(errors))
    return [o for o, _ in results]


def _link(objs, out, flags):
    key = _digest(flags, objs)
    stamp = out + ".key"
    if os.path.exists(out) and os.path.exists(stamp) and open(stamp).read() == key:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [CXX] + objs + ["-o", out + ".tmp"] + flags
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda_emu link failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    os.replace(out + ".tmp", out)
    with open(stamp, "w") as f:
        f.write(key)
    return out


def kernel_sources(src_root=CSRC):
    return _files(os.path.join(src_root, "cuda", "*.cu"))


def _kernel_deps(src_root):
    return _files(os.path.join(src_root, "*.h"), os.path.join(src_root, "cuda", "*.h"),
                  os.path.join(src_root, "cuda", "*.cuh"), os.path.join(EMU_INCLUDE, "*.h"))


def _runtime_jobs(flavour):
    _, rt_flags, _ = FLAVOURS[flavour]
    flags = COMMON + rt_flags + ["-std=c++17", "-I", EMU_INCLUDE]
    deps = _files(os.path.join(EMU_INCLUDE, "*.h"), os.path.join(EMU_SRC, "*.h"))
    return [(os.path.join(EMU_SRC, f), flags, deps) for f in ("runtime.cpp", "fiber.cpp")]


def _kernel_jobs(flavour, src_root):
    k_flags, _, _ = FLAVOURS[flavour]
    flags = COMMON + k_flags + ["-std=c++17", "-I", EMU_INCLUDE, "-I", src_root]
    deps = _kernel_deps(src_root)
    return [(src, flags, deps) for src in kernel_sources(src_root)]


def kernel_objects(flavour="plain", src_root=CSRC):
    """The emulator builds of csrc/cuda/*.cu (for listing the kernels they define)."""
    return _build_objects(_kernel_jobs(flavour, src_root), src_root)


def build_module(flavour="plain", src_root=CSRC, tag=""):
    """Builds the fastbn_cuda_emu extension; returns the path of the .so."""
    if flavour == "tsan":
        raise ValueError("ThreadSanitizer cannot run inside Python: use build_driver('tsan')")
    import torch
    import torch.utils.cpp_extension as cpp

    k_flags, _, link_flags = FLAVOURS[flavour]
    # The torch-facing code gets AddressSanitizer only (UBSan would report inside torch's headers).
    host_k = [f for f in k_flags if f not in ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")]
    if flavour == "asan":
        host_k += ["-fsanitize=address"]
    torch_flags = (COMMON + host_k + ["-std=c++20", "-O1", "-I", EMU_INCLUDE, "-I", src_root,
                                      "-I", sysconfig.get_paths()["include"],
                                      f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                                      f"-DTORCH_EXTENSION_NAME={MODULE_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
                   + [f"-I{p}" for p in cpp.include_paths()])
    torch_deps = _files(os.path.join(src_root, "*.h"), os.path.join(src_root, "cuda", "*.h"),
                        os.path.join(EMU_INCLUDE, "*.h"))
    jobs = _runtime_jobs(flavour) + _kernel_jobs(flavour, src_root) + [
        (os.path.join(EMU_SRC, "module.cpp"), torch_flags, torch_deps),
        (os.path.join(src_root, "checks.cpp"), torch_flags, torch_deps),
        (os.path.join(EMU_SRC, "env.cpp"), COMMON + host_k + ["-std=c++17", "-I", EMU_INCLUDE, "-I", src_root],
         torch_deps),
    ]
    objs = _build_objects(jobs, src_root)
    libdirs = cpp.library_paths()
    link = (["-shared", "-pthread"] + link_flags + [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath,{d}" for d in libdirs]
            + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    out = os.path.join(BUILD, flavour + (f"-{tag}" if tag else ""), MODULE_NAME + suffix)
    return _link(objs, out, link)


def build_driver(flavour="tsan", src_root=CSRC, tag=""):
    """Builds the torch-free driver (src/driver.cpp); returns the executable's path."""
    k_flags, _, link_flags = FLAVOURS[flavour]
    drv_flags = COMMON + k_flags + ["-std=c++17", "-I", EMU_INCLUDE, "-I", src_root]
    jobs = _runtime_jobs(flavour) + _kernel_jobs(flavour, src_root) + [
        (os.path.join(EMU_SRC, "driver.cpp"), drv_flags, _kernel_deps(src_root))]
    objs = _build_objects(jobs, src_root)
    out = os.path.join(BUILD, flavour + (f"-{tag}" if tag else ""), "cuda_emu_driver")
    return _link(objs, out, ["-pthread"] + link_flags)


def build_selftest(flavour="plain"):
    """Builds the emulator's own tests (src/selftest.cu); returns the executable's path."""
    k_flags, _, link_flags = FLAVOURS[flavour]
    flags = COMMON + k_flags + ["-std=c++17", "-I", EMU_INCLUDE]
    jobs = _runtime_jobs(flavour) + [(os.path.join(EMU_SRC, "selftest.cu"), flags,
                                      _files(os.path.join(EMU_INCLUDE, "*.h")))]
    out = os.path.join(BUILD, flavour, "cuda_emu_selftest")
    return _link(_build_objects(jobs), out, ["-pthread"] + link_flags)


def load_module(path):
    """Imports a built fastbn_cuda_emu extension from its path."""
    import importlib.util

    import torch  # noqa: F401  (the extension links against torch's libraries)

    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sanitizer_env(flavour):
    """Environment for running a process that loads the `flavour` module or driver."""
    env = dict(os.environ)
    if flavour == "asan":
        lib = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
        env["LD_PRELOAD"] = lib
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23:halt_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=23"
    elif flavour == "tsan":
        env["TSAN_OPTIONS"] = "exitcode=66:halt_on_error=0:report_signal_unsafe=0"
    return env


def run(cmd, flavour, **kwargs):
    """subprocess.run(cmd) with the flavour's sanitizer environment, output captured as text.
    A sanitizer that cannot map its shadow memory under this kernel's address-space
    randomisation is retried once with randomisation off (setarch -R)."""
    kwargs.setdefault("env", sanitizer_env(flavour))
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if flavour != "plain" and re.search(r"unexpected memory mapping|Shadow memory range interleaves", r.stderr):
        r = subprocess.run(["setarch", os.uname().machine, "-R"] + list(cmd), capture_output=True, text=True,
                           **kwargs)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["module", "driver", "selftest"])
    ap.add_argument("--flavor", default="plain", choices=sorted(FLAVOURS))
    a = ap.parse_args()
    print({"module": build_module, "driver": build_driver, "selftest": build_selftest}[a.what](a.flavor))


if __name__ == "__main__":
    sys.exit(main())
