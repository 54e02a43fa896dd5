// score_client: scores a batch with an AOTInductor package from `lightning-mtr export --aot`,
// using only libtorch (no Python at run time).
//
// Build against the libtorch inside the torch wheel (what lightning_mtr.serving.aot.build_client
// runs; T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))"), and
// ABI=$(python -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")):
//   g++ -std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI=$ABI -I$T/include -I$T/include/torch/csrc/api/include \
//       score_client.cpp -o score_client -L$T/lib -Wl,-rpath,$T/lib -ltorch -ltorch_cpu -lc10
//
// Run:  score_client MODEL.aoti.pt2 INPUTS.pt OUTPUTS.pt [REPEATS]
// INPUTS.pt: a tuple (or list) of tensors in the program's input order, written by Python
//   torch.save((dense, values, lengths), "INPUTS.pt") (zip format, the default), or by
//   torch::pickle_save in C++. For the exported ranking program:
//     dense   float64 [B, n_dense]  raw dense features (the program applies the schema transforms)
//     values  int64   [N]           ids of every sparse feature, feature-major (KeyedJaggedTensor)
//     lengths int64   [F, B]        ids per feature per row, features in manifest.json order
// OUTPUTS.pt: a tuple of the program's output tensors (float32 [B] each) in the order of
//   manifest.json's outputs; Python reads it with torch.load("OUTPUTS.pt").
// REPEATS (default 0): extra timed runs; prints the median, so that load and warm-up are apart.
// OMP_NUM_THREADS sets the threads the compiled kernels use. The package checks every input's
// dtype and shape against the exported program (AOTI_RUNTIME_CHECK_INPUTS, set here unless the
// environment sets it): a float32 `dense` is refused, not silently misread.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<at::Tensor> read_inputs(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open inputs file " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  c10::IValue value = torch::jit::pickle_load(bytes);
  std::vector<c10::IValue> items;
  if (value.isTuple()) {
    for (const auto& v : value.toTupleRef().elements()) items.push_back(v);
  } else if (value.isList()) {
    for (const auto& v : value.toListRef()) items.push_back(v);
  } else {
    throw std::runtime_error(path + " must hold a tuple of tensors (torch.save((dense, values, lengths), path))");
  }
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].isTensor())
      throw std::runtime_error(path + ": item " + std::to_string(i) + " is not a tensor");
    inputs.push_back(items[i].toTensor().contiguous());
  }
  return inputs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.aoti.pt2 INPUTS.pt OUTPUTS.pt [REPEATS]\n";
    return 2;
  }
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
  try {
    std::vector<at::Tensor> inputs = read_inputs(argv[2]);
    int repeats = argc == 5 ? std::atoi(argv[4]) : 0;
    auto t0 = std::chrono::steady_clock::now();
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    double load_ms = ms_since(t0);
    t0 = std::chrono::steady_clock::now();
    std::vector<at::Tensor> outputs = loader.run(inputs);
    double first_ms = ms_since(t0);
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
      t0 = std::chrono::steady_clock::now();
      loader.run(inputs);
      times.push_back(ms_since(t0));
    }
    std::vector<c10::IValue> items(outputs.begin(), outputs.end());
    std::vector<char> bytes = torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(items)));
    std::ofstream out(argv[3], std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error(std::string("cannot write outputs file ") + argv[3]);
    std::cout << "batch " << (inputs.empty() ? 0 : inputs[0].size(0)) << ", load " << load_ms
              << " ms, first run " << first_ms << " ms";
    if (!times.empty()) {
      std::sort(times.begin(), times.end());
      std::cout << ", median of " << times.size() << " runs " << times[times.size() / 2] << " ms";
    }
    std::cout << "\n";
  } catch (const std::exception& e) {
    std::cerr << "score_client: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
