// A C++ libtorch service, as small as one can be: loads lstmopt's ops library, a TorchScript artifact,
// runs it on one input and writes its output. tests/test_deployment.py builds and runs it; the README's
// deployment section quotes its two lines that matter (the dlopen and the torch::jit::load).
//
// usage: run_artifact LIBRARY ARTIFACT INPUT OUTPUT   (INPUT from torch.save, OUTPUT for torch.load)

#include <dlfcn.h>
#include <torch/script.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

static std::vector<char> read_file(const char* path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: run_artifact LIBRARY ARTIFACT INPUT OUTPUT\n";
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW) == nullptr) {  // registers torch.ops.lstmopt.* for this CPU
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[2]);
    model.eval();
    const torch::IValue input = torch::jit::pickle_load(read_file(argv[3]));
    torch::InferenceMode inference;
    const torch::IValue output = model.forward({input});
    const std::vector<char> bytes = torch::jit::pickle_save(output);
    std::ofstream(argv[4], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  } catch (const std::exception& error) {
    std::cerr << error.what() << "\n";
    return 1;
  }
  return 0;
}
