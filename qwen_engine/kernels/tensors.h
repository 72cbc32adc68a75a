// What the kernel sources take from torch: tensors, their allocation and ATen's thread pool.
//
// torch/extension.h (all of libtorch's C++ API and the Python bindings) takes ~20 s to parse, these headers ~3 s.
// Only bindings.cpp, which makes the Python module, includes it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
