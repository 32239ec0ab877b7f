"""Where each run writes: CoOp/MaPLe/PromptSRC's output layout, as scripts/tasks/*.sh writes it.
The sweep (to skip and order runs) and the report (to read them) both go through these."""


def base2new(output: str, stage: str, dataset: str, trainer: str, cfg: str, seed: int) -> str:
    """stage: train_base (training, tested on base), test_base (eval-only methods), test_new."""
    return f"{output}/base2new/{stage}/{dataset}/shots_16/{trainer}/{cfg}/seed{seed}"


def xd_train(output: str, source: str, trainer: str, cfg: str, seed: int) -> str:
    return f"{output}/{source}/{trainer}/{cfg}_16shots/seed{seed}"


def xd_test(output: str, dataset: str, trainer: str, cfg: str, seed: int) -> str:
    return f"{output}/evaluation/{trainer}/{cfg}_16shots/{dataset}/seed{seed}"


def zero_shot_test(output: str, dataset: str, cfg: str) -> str:
    """scripts/zsclip/xd.sh: one deterministic run, no shots."""
    return f"{output}/evaluation/ZeroshotCLIP/{cfg}/{dataset}/seed1"


def few_shot(output: str, dataset: str, trainer: str, cfg: str, shots: int, seed: int) -> str:
    return f"{output}/{dataset}/{trainer}/{cfg}_{shots}shots/seed{seed}"
