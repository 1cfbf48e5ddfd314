"""vllm_e3.artifacts: committed E3 artifacts, installed as package data.

`smollm2-135m/e3/` holds the embedded default model's ramps, calibration and
E3 config, made by `make ramps` (`vllm-e3 train` + `vllm-e3 calibrate`; both
command lines are in the files' metadata). `vllm-e3 prepare` installs them
into `<model_dir>/e3/` after checking the base-model hash
(`vllm_e3.prepare.deploy_artifact`).
"""
