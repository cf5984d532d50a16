"""The serving benchmark behind `peftserve bench`: seeded many-adapter traces, systems, metrics, report.

Modules by what they own:

    shapes      DESIGN.md benchmark shapes and useful-FLOP counting
    models      seeded random-weight Llama models of the shapes, and their tokenizer
    machine     dense matmul rate and the environment the numbers were measured on
    config      the benchmark's frozen configuration (full run and --quick preset)
    workload    seeded traces: arrivals, adapter popularity, prompt and output lengths
    adapters    random-weight LoRA adapters written in PEFT format into a store layout
    server      a `peftserve serve` subprocess and its Prometheus endpoint
    records     per-request timings and the metrics summarized from them
    grpc_system peftserve over gRPC with the async SDK (adapters, or every request on the base)
    peft_system Hugging Face PEFT used directly: one request at a time, and static batches
    suite       the scenarios run on one trace per scenario, in one run
    report      tables, targets, results.json and the plot

`shapes`, `config`, `workload`, `records` and `cli` import no torch.
"""
