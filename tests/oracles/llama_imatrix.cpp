// llama-imatrix itself (tools/imatrix/imatrix.cpp, its own main, unchanged), built without
// common/arg.cpp: that parser declares every option of every llama.cpp tool and pulls in the whole
// common/ library (chat templates, jinja, HTTP downloads). This file gives it a
// common_params_parse that understands the few options the benchmarks pass, with arg.cpp's
// meaning for each, and arg.cpp's post-processing of the thread counts. Fitting to device memory
// is off (as `-fit off`): it only places layers and context on devices, and these runs are CPU only.
//
// usage: llama-imatrix -m MODEL.gguf -f TEXT -o OUT [-c N] [--chunks N] [-t N] [-b N] [-ub N]
//                      [--no-ppl] [--process-output] [--output-format gguf|dat] [--in-file F]...
#include "tools/imatrix/imatrix.cpp"

bool common_params_parse(int argc, char ** argv, common_params & params, llama_example, void (*usage)(int, char **)) {
    params.fit_params = false;
    try {
        for (int i = 1; i < argc; ++i) {
            const std::string arg = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) {
                    throw std::invalid_argument("expected value for argument " + arg);
                }
                return argv[++i];
            };
            if (arg == "-m" || arg == "--model") {
                params.model.path = value();
            } else if (arg == "-f" || arg == "--file") {
                params.prompt_file = value();
                std::ifstream in(params.prompt_file, std::ios::binary);
                if (!in) {
                    throw std::invalid_argument("cannot read " + params.prompt_file);
                }
                params.prompt.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
                if (!params.prompt.empty() && params.prompt.back() == '\n') {
                    params.prompt.pop_back();
                }
            } else if (arg == "-o" || arg == "--output-file") {
                params.out_file = value();
            } else if (arg == "--in-file") {
                params.in_files.push_back(value());
            } else if (arg == "-c" || arg == "--ctx-size") {
                params.n_ctx = std::stoi(value());
            } else if (arg == "--chunks") {
                params.n_chunks = std::stoi(value());
            } else if (arg == "-t" || arg == "--threads") {
                params.cpuparams.n_threads = std::stoi(value());
            } else if (arg == "-b" || arg == "--batch-size") {
                params.n_batch = std::stoi(value());
            } else if (arg == "-ub" || arg == "--ubatch-size") {
                params.n_ubatch = std::stoi(value());
            } else if (arg == "--no-ppl") {
                params.compute_ppl = false;
            } else if (arg == "--process-output") {
                params.process_output = true;
            } else if (arg == "--output-format") {
                const std::string v = value();
                if (v != "gguf" && v != "dat") {
                    throw std::invalid_argument("invalid output format");
                }
                params.imat_dat = v == "dat" ? 1 : -1;
            } else {
                throw std::invalid_argument("invalid argument: " + arg);
            }
        }
    } catch (const std::exception & e) {
        fprintf(stderr, "%s\n", e.what());
        if (usage) {
            usage(argc, argv);
        }
        return false;
    }
    postprocess_cpu_params(params.cpuparams, nullptr);
    postprocess_cpu_params(params.cpuparams_batch, &params.cpuparams);
    if (params.model.path.empty() && params.in_files.empty()) {
        fprintf(stderr, "error: --model is required\n");
        return false;
    }
    return true;
}
