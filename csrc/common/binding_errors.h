// Argument checks for the torch bindings (_C_sm90, _C_fp4) that never throw: a failed check returns its message,
// the entry point hands it to Python as a str ("error: ..."), and the Python wrapper raises it.
// Why: where the build toolchain's libstdc++ differs from the process's, any std::ostringstream instantiated in
// the module (TORCH_CHECK and c10::str use one) can kill the process with SIGSEGV on an error path, thrown or not,
// while messages formatted inside libtorch itself are safe. So messages are built with snprintf and returned.
// Binding files only (includes torch headers).
#pragma once
#include <torch/extension.h>

#include <cstdio>
#include <string>

namespace sage3::binding {

inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, long long x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", x);
  s += buf;
}
inline void append(std::string& s, long x) { append(s, static_cast<long long>(x)); }
inline void append(std::string& s, int x) { append(s, static_cast<long long>(x)); }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, c10::IntArrayRef a) {
  s += "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    append(s, static_cast<long long>(a[i]));
  }
  s += "]";
}
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

// None, or the error message as a Python str (entry points without a result).
inline py::object to_python(const std::string& err) {
  if (!err.empty()) return py::str("error: " + err);
  return py::none();
}
// The result list, or the error message as a Python str.
inline py::object to_python(const std::string& err, const std::vector<at::Tensor>& result) {
  if (!err.empty()) return to_python(err);
  return py::cast(result);
}

}  // namespace sage3::binding

// Inside a function returning std::string (the error message; empty = success).
#define SAGE3_CHECK(cond, ...)                                  \
  do {                                                          \
    if (!(cond)) return ::sage3::binding::message(__VA_ARGS__); \
  } while (0)
#define SAGE3_TRY(expr)             \
  do {                              \
    std::string err_ = (expr);      \
    if (!err_.empty()) return err_; \
  } while (0)
