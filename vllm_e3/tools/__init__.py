"""The offline tools: everything that makes and checks a deployment's ramps
and thresholds, never imported by the serving path.

    data.py       prompts, corpora (vanilla vLLM), teacher-forced captures, caches
    train.py      `vllm-e3 train`: ramps by self-distillation, and gates
    selection.py  scores per held-out row, AUC, the threshold ladder and its test
    costs.py      per-token costs (torch on the real weights) and the engine model
                  (the planner's step simulation, vllm_e3.simulate)
    reference.py  plain-PyTorch references of the exit semantics
    calibrate.py  `vllm-e3 calibrate`: the command and its report

Their arguments are declared in vllm_e3/cli.py; calibration.json's schema is
vllm_e3/calibration.py's.
"""
