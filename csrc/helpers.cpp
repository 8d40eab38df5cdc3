// Index builders for GPT-style pretraining data (pybind11 extension megatron_aquila.data._helpers).
//
// Semantics follow Megatron-LM's dataset helpers (see docs in megatron_aquila/data/helpers.py and
// DESIGN.md section 5):
//   build_sample_idx_int32 / build_sample_idx_int64
//       [num_samples + 1, 2] rows of (position in document index, token offset in that document);
//       sample k spans rows k and k + 1 and holds seq_length + add_extra tokens; with the extra
//       token the next sample starts on the last token of the previous one.
//   build_blending_indices
//       greedy blend: sample k goes to argmax_i (w_i * max(k, 1) - count_i), first index on ties.
//   build_exhaustive_blending_indices
//       the same greedy rule with w_i = size_i / sum(size), over the datasets that still have
//       unused samples, until every sample of every dataset is used exactly once.
//
// Arguments are checked here (dtype, shape, contiguity, bounds) and reported as ValueError, so a
// wrong call can never write out of bounds or into a silently converted copy of an output array.
// The heavy loops run with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

template <typename... Parts>
std::string concat(const Parts &...parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}

// Check that `array` is a 1-D C-contiguous array of dtype T; `writable` for outputs.
template <typename T>
void check_vector(const py::array &array, const char *name, bool writable) {
  if (!py::isinstance<py::array_t<T>>(array)) {
    throw std::invalid_argument(concat(name, " must have dtype ", std::string(py::str(py::dtype::of<T>())),
                                       ", got ", std::string(py::str(array.dtype())),
                                       "; convert it with .astype() before the call"));
  }
  if (array.ndim() != 1) {
    throw std::invalid_argument(concat(name, " must be 1-D, got ", array.ndim(), " dimensions"));
  }
  if (!(array.flags() & py::array::c_style)) {
    throw std::invalid_argument(concat(name, " must be C-contiguous; pass numpy.ascontiguousarray(", name, ")"));
  }
  if (writable && !array.writeable()) {
    throw std::invalid_argument(concat(name, " is an output and must be writable"));
  }
}

template <typename T>
py::array_t<T> build_sample_idx(const py::array &sizes_array, const py::array &document_index_array,
                                int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                                bool drop_last_partial_sequence, bool add_extra_token_to_sequence) {
  check_vector<int32_t>(sizes_array, "sizes", false);
  check_vector<int32_t>(document_index_array, "document_index", false);
  if (seq_length < 1) throw std::invalid_argument(concat("seq_length must be >= 1, got ", seq_length));
  if (num_epochs < 1) throw std::invalid_argument(concat("num_epochs must be >= 1, got ", num_epochs));
  const int64_t extra = add_extra_token_to_sequence ? 1 : 0;
  if (tokens_per_epoch <= extra) {
    throw std::invalid_argument(concat("tokens_per_epoch must be > ", extra, ", got ", tokens_per_epoch));
  }
  const auto *sizes = static_cast<const int32_t *>(sizes_array.data());
  const auto *document_index = static_cast<const int32_t *>(document_index_array.data());
  const int64_t num_sizes = sizes_array.shape(0);
  const int64_t num_documents = document_index_array.shape(0);
  if (num_documents == 0) throw std::invalid_argument("document_index is empty");
  if (num_documents > std::numeric_limits<T>::max()) {
    throw std::invalid_argument(concat("document_index has ", num_documents,
                                       " entries, more than this output dtype holds; use the int64 builder"));
  }

  // Validate every document id and that the tokens add up to num_epochs * tokens_per_epoch.
  int64_t total_tokens = 0;
  for (int64_t i = 0; i < num_documents; ++i) {
    const int32_t document = document_index[i];
    if (document < 0 || document >= num_sizes) {
      throw std::invalid_argument(concat("document_index[", i, "] = ", document, " is outside [0, ", num_sizes,
                                         ") (len(sizes))"));
    }
    if (sizes[document] < 0) {
      throw std::invalid_argument(concat("sizes[", document, "] = ", sizes[document], " is negative"));
    }
    total_tokens += sizes[document];
  }
  if (total_tokens != num_epochs * tokens_per_epoch) {
    throw std::invalid_argument(concat("sizes[document_index] sums to ", total_tokens, " tokens but num_epochs * ",
                                       "tokens_per_epoch = ", num_epochs, " * ", tokens_per_epoch, " = ",
                                       num_epochs * tokens_per_epoch,
                                       "; document_index must be the epoch's documents tiled num_epochs times"));
  }

  const int64_t usable_tokens = total_tokens - extra;
  const int64_t num_samples = drop_last_partial_sequence ? usable_tokens / seq_length
                                                         : (usable_tokens + seq_length - 1) / seq_length;
  if (num_samples < 1) {
    throw std::invalid_argument(concat("only ", total_tokens, " tokens: not enough for one sample of ",
                                       seq_length + extra, " tokens"));
  }

  py::array_t<T> result({num_samples + 1, int64_t{2}});
  T *out = result.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t position = 0;  // position in document_index
    int64_t offset = 0;    // token offset inside document_index[position]
    out[0] = 0;
    out[1] = 0;
    for (int64_t sample = 1; sample <= num_samples; ++sample) {
      int64_t remaining = seq_length + extra;
      while (remaining != 0) {
        const int64_t available = sizes[document_index[position]] - offset;
        remaining -= available;
        if (remaining <= 0) {
          // The sample ends inside this document; with the extra token the next one starts on
          // the sample's last token, hence "- extra".
          offset += remaining + available - extra;
          remaining = 0;
        } else if (position == num_documents - 1) {
          // Out of documents: only the last (partial) sample may get here.
          offset = sizes[document_index[position]] - extra;
          break;
        } else {
          ++position;
          offset = 0;
        }
      }
      out[2 * sample] = static_cast<T>(position);
      out[2 * sample + 1] = static_cast<T>(offset);
    }
  }
  return result;
}

template <typename Index>
void blend_greedy(Index *dataset_index, int64_t *dataset_sample_index, const double *weights, int64_t num_datasets,
                  int64_t size) {
  std::vector<int64_t> counts(num_datasets, 0);
  for (int64_t sample = 0; sample < size; ++sample) {
    const double k = std::max(static_cast<double>(sample), 1.0);
    int64_t best = 0;
    double best_error = weights[0] * k - static_cast<double>(counts[0]);
    for (int64_t i = 1; i < num_datasets; ++i) {
      const double error = weights[i] * k - static_cast<double>(counts[i]);
      if (error > best_error) {
        best_error = error;
        best = i;
      }
    }
    dataset_index[sample] = static_cast<Index>(best);
    dataset_sample_index[sample] = counts[best];
    ++counts[best];
  }
}

template <typename Index>
void check_dataset_count(int64_t num_datasets) {
  if (num_datasets < 1 || num_datasets > std::numeric_limits<Index>::max() + int64_t{1}) {
    throw std::invalid_argument(concat("num_datasets = ", num_datasets, " does not fit dataset_index of dtype ",
                                       std::string(py::str(py::dtype::of<Index>())),
                                       "; use int16 for up to 32768 datasets"));
  }
}

void build_blending_indices(py::array &dataset_index, py::array &dataset_sample_index, const py::array &weights,
                            int64_t num_datasets, int64_t size, bool verbose) {
  check_vector<int64_t>(dataset_sample_index, "dataset_sample_index", true);
  check_vector<double>(weights, "weights", false);
  if (weights.shape(0) != num_datasets) {
    throw std::invalid_argument(concat("weights has ", weights.shape(0), " entries but num_datasets = ", num_datasets));
  }
  if (size < 0 || dataset_index.ndim() != 1 || dataset_index.shape(0) < size || dataset_sample_index.shape(0) < size) {
    throw std::invalid_argument(concat("size = ", size, " but dataset_index has ", dataset_index.size(),
                                       " and dataset_sample_index ", dataset_sample_index.size(),
                                       " entries; allocate both with at least `size` entries"));
  }
  const auto *w = static_cast<const double *>(weights.data());
  auto *sample_out = static_cast<int64_t *>(dataset_sample_index.mutable_data());
  if (py::isinstance<py::array_t<uint8_t>>(dataset_index)) {
    check_vector<uint8_t>(dataset_index, "dataset_index", true);
    check_dataset_count<uint8_t>(num_datasets);
    auto *out = static_cast<uint8_t *>(dataset_index.mutable_data());
    py::gil_scoped_release release;
    blend_greedy(out, sample_out, w, num_datasets, size);
  } else {
    if (!py::isinstance<py::array_t<int16_t>>(dataset_index)) {
      throw std::invalid_argument(concat("dataset_index must have dtype uint8 or int16, got ",
                                         std::string(py::str(dataset_index.dtype()))));
    }
    check_vector<int16_t>(dataset_index, "dataset_index", true);
    check_dataset_count<int16_t>(num_datasets);
    auto *out = static_cast<int16_t *>(dataset_index.mutable_data());
    py::gil_scoped_release release;
    blend_greedy(out, sample_out, w, num_datasets, size);
  }
  if (verbose) {
    std::vector<int64_t> counts(num_datasets, 0);
    const auto *index_bytes = static_cast<const char *>(dataset_index.data());
    const bool is_uint8 = dataset_index.itemsize() == 1;
    for (int64_t sample = 0; sample < size; ++sample) {
      ++counts[is_uint8 ? reinterpret_cast<const uint8_t *>(index_bytes)[sample]
                        : reinterpret_cast<const int16_t *>(index_bytes)[sample]];
    }
    for (int64_t i = 0; i < num_datasets; ++i) {
      std::cout << "  dataset " << i << ": weight " << w[i] << ", achieved "
                << static_cast<double>(counts[i]) / static_cast<double>(size > 0 ? size : 1) << std::endl;
    }
  }
}

void build_exhaustive_blending_indices(py::array &dataset_index, py::array &dataset_sample_index,
                                       const py::array &sizes, int64_t num_datasets) {
  check_vector<int16_t>(dataset_index, "dataset_index", true);
  check_vector<int64_t>(dataset_sample_index, "dataset_sample_index", true);
  check_vector<int64_t>(sizes, "sizes", false);
  check_dataset_count<int16_t>(num_datasets);
  if (sizes.shape(0) != num_datasets) {
    throw std::invalid_argument(concat("sizes has ", sizes.shape(0), " entries but num_datasets = ", num_datasets));
  }
  const auto *size_of = static_cast<const int64_t *>(sizes.data());
  int64_t total = 0;
  for (int64_t i = 0; i < num_datasets; ++i) {
    if (size_of[i] < 0) throw std::invalid_argument(concat("sizes[", i, "] = ", size_of[i], " is negative"));
    total += size_of[i];
  }
  if (dataset_index.shape(0) != total || dataset_sample_index.shape(0) != total) {
    throw std::invalid_argument(concat("sum(sizes) = ", total, " but dataset_index has ", dataset_index.shape(0),
                                       " and dataset_sample_index ", dataset_sample_index.shape(0),
                                       " entries; allocate both with exactly sum(sizes) entries"));
  }
  auto *index_out = static_cast<int16_t *>(dataset_index.mutable_data());
  auto *sample_out = static_cast<int64_t *>(dataset_sample_index.mutable_data());

  py::gil_scoped_release release;
  std::vector<double> weights(num_datasets);
  std::vector<int64_t> counts(num_datasets, 0);
  // Datasets with unused samples, in increasing id order (ties go to the lowest id). An empty
  // dataset is never listed: it has nothing to give (Megatron-LM lists it and can then pick it).
  std::vector<int64_t> unspent;
  for (int64_t i = 0; i < num_datasets; ++i) {
    weights[i] = static_cast<double>(size_of[i]) / static_cast<double>(total);
    if (size_of[i] > 0) unspent.push_back(i);
  }
  for (int64_t sample = 0; sample < total; ++sample) {
    const double k = std::max(static_cast<double>(sample), 1.0);
    size_t best_slot = 0;
    double best_error = std::numeric_limits<double>::lowest();
    for (size_t slot = 0; slot < unspent.size(); ++slot) {
      const int64_t i = unspent[slot];
      const double error = weights[i] * k - static_cast<double>(counts[i]);
      if (error > best_error) {
        best_error = error;
        best_slot = slot;
      }
    }
    const int64_t best = unspent[best_slot];
    index_out[sample] = static_cast<int16_t>(best);
    sample_out[sample] = counts[best];
    if (++counts[best] == size_of[best]) unspent.erase(unspent.begin() + static_cast<std::ptrdiff_t>(best_slot));
  }
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for megatron_aquila datasets; call them through megatron_aquila.data.helpers";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token_to_sequence") = true,
        "Sample index [num_samples + 1, 2] as int32 (every document position and size must fit int32).");
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token_to_sequence") = true,
        "Sample index [num_samples + 1, 2] as int64.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"), py::arg("dataset_sample_index"),
        py::arg("weights"), py::arg("num_datasets"), py::arg("size"), py::arg("verbose") = false,
        "Fill dataset_index (uint8 or int16) and dataset_sample_index (int64) by the greedy weighted blend.");
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices, py::arg("dataset_index"),
        py::arg("dataset_sample_index"), py::arg("sizes"), py::arg("num_datasets"),
        "Fill dataset_index (int16) and dataset_sample_index (int64) using every sample of every dataset once.");
}
