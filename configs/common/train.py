# Options of Detectron2's tools/lazyconfig_train_net.py (the YAML configs' OUTPUT_DIR,
# MODEL.WEIGHTS, SOLVER.MAX_ITER / CHECKPOINT_PERIOD, TEST.EVAL_PERIOD, SEED keys).
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device="cuda",
    seed=-1,
)
