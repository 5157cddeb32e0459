"""Checkpoint in -> checkpoint (or report) out: one module per command, one entry point each,
named verb_object, each returning one result type.

    deltas        apply_delta, make_delta        -> DeltaReport
    convert       convert_checkpoint             -> ConvertReport
    expand_vocab  expand_vocab                   -> VocabReport
    gguf          export_gguf                    -> GGUFReport
                  export_gguf_matrix             -> list[GGUFReport] (one read, many files)
    bnb           export_bnb                     -> BnbReport
    fused         export_fused                   -> FusedReport (GGUF and bnb outputs, one read)
    verify        verify_checkpoint              -> the verify JSON document (dict)
    manifest      create_manifest, check_manifest -> the manifest's path / document
    inspect       inspect_checkpoint             -> the inspect JSON document (dict)

Pipelines open checkpoints and publish outputs (io/), and run the stream operators of
ops/, quant/ and verify/ in between; the CLI and the job runner call only these.
"""
