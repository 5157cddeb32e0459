// llama-imatrix's combine path, on llama-imatrix's own code: what its main() does with
// `--in-file A --in-file B ... -c CTX [--output-format dat] -o OUT` and no text (the rest of
// its main, which needs the whole common/ library, is renamed away and dropped by the linker).
//
// usage: imatrix-combine OUT gguf|dat CTX IN...
#define main llama_imatrix_main
#include "tools/imatrix/imatrix.cpp"
#undef main

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s OUT gguf|dat CTX IN...\n", argv[0]);
        return 2;
    }
    common_params params;
    params.out_file = argv[1];
    params.imat_dat = std::string(argv[2]) == "dat" ? 1 : -1;
    params.n_ctx    = std::atoi(argv[3]);
    // as llama-imatrix's main: sequences per batch, chunk size = n_ctx / n_parallel
    const int32_t n_seq = std::max(1, params.n_batch / params.n_ctx);
    params.n_parallel   = n_seq;
    params.n_ctx        = n_seq * params.n_ctx;
    g_collector.set_params(params);
    for (int i = 4; i < argc; ++i) {
        if (!g_collector.load_imatrix(argv[i])) {
            fprintf(stderr, "failed to load %s\n", argv[i]);
            return 1;
        }
    }
    g_collector.save_imatrix();
    return 0;
}
