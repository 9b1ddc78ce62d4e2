// liblstmopt.so: the one file to load for lstmopt's ops (torch.ops.load_library from Python, dlopen from
// C++). When loaded it picks the fastest build of lstm.cpp this CPU can run, from the files beside it
// (lstmopt_ops_<variant>.so), and loads that; it has no code of its own that needs more than x86-64.
//
// LSTMOPT_NATIVE_VARIANT=<name> asks for one variant (tests, or to compare them); a variant the CPU lacks
// is refused, never loaded: it would die of an illegal instruction at its first call.

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

struct Variant {
  const char* name;
  bool (*runs_here)();
};

bool has_avx2() {
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
bool anywhere() { return true; }

// Fastest first; the flags each is built with are in lstmopt/kernels/compile.py.
constexpr Variant VARIANTS[] = {{"avx512", has_avx512}, {"avx2", has_avx2}, {"baseline", anywhere}};

// Plain C storage: a constructor function may run before C++ globals are constructed.
const char* loaded = "";
char error[1024] = "";

std::string directory_of_this_file() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&directory_of_this_file), &info) == 0 || info.dli_fname == nullptr) return ".";
  const std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

bool load(const Variant& variant) {
  const std::string path = directory_of_this_file() + "/lstmopt_ops_" + variant.name + ".so";
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL) == nullptr) {
    const char* why = dlerror();
    std::snprintf(error, sizeof error, "cannot load %s: %s", path.c_str(), why ? why : "unknown error");
    return false;
  }
  loaded = variant.name;
  return true;
}

__attribute__((constructor)) void load_for_this_cpu() {
  __builtin_cpu_init();
  const char* requested = std::getenv("LSTMOPT_NATIVE_VARIANT");
  if (requested != nullptr && *requested != '\0') {
    for (const Variant& variant : VARIANTS) {
      if (std::strcmp(variant.name, requested) != 0) continue;
      if (!variant.runs_here())
        std::snprintf(error, sizeof error, "LSTMOPT_NATIVE_VARIANT=%s: this CPU lacks the instructions it needs",
                      requested);
      else
        load(variant);
      break;
    }
    if (*loaded == '\0' && *error == '\0')
      std::snprintf(error, sizeof error, "LSTMOPT_NATIVE_VARIANT=%s is none of avx512, avx2, baseline", requested);
  } else {
    for (const Variant& variant : VARIANTS)
      if (variant.runs_here()) {
        load(variant);
        break;
      }
  }
  // A C++ process has no other way to hear it: torch::jit::load would only say "Unknown builtin op".
  if (*loaded == '\0' && std::getenv("LSTMOPT_LOADER_QUIET") == nullptr)
    std::fprintf(stderr, "lstmopt: native kernel not loaded (%s)\n", error);
}

}  // namespace

extern "C" {
// The variant loaded ("avx512", "avx2", "baseline"), or "" if none.
const char* lstmopt_variant() { return loaded; }
// Why no variant was loaded, or "".
const char* lstmopt_error() { return error; }
}
