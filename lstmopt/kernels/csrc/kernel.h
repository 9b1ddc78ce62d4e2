// What lstm.cpp and pack.cpp offer the other files of the ops library (dense.cpp): the kernel and its packing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

// The cell a layer runs (cells.h): nn.LSTM's, nn.GRU's, or nn.RNN's with tanh or relu.
enum class Cell { lstm, gru, rnn_tanh, rnn_relu };
inline bool one_gate(Cell cell) { return cell == Cell::rnn_tanh || cell == Cell::rnn_relu; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent(const at::Tensor& input,
                                                         const std::optional<at::Tensor>& batch_sizes,
                                                         const std::optional<at::Tensor>& hx,
                                                         const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                         at::TensorList biases, int64_t hidden_size,
                                                         bool bidirectional, bool batch_first,
                                                         at::TensorList projections, int64_t proj_size, Cell cell);
// weights_format: "float32", "bfloat16" (weights rounded to bf16) or "int8" (no projection; lstm.cpp's "int8 weights").
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack(at::TensorList dense, int64_t hidden_size,
                                                                  bool has_biases, int64_t proj_size,
                                                                  std::string weights_format = "float32");
std::vector<at::Tensor> pack_projections(at::TensorList dense, int64_t hidden_size, bool has_biases,
                                         int64_t proj_size);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack_gru(at::TensorList dense, int64_t hidden_size,
                                                                      bool has_biases);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack_rnn(at::TensorList dense, int64_t hidden_size,
                                                                      bool has_biases);
