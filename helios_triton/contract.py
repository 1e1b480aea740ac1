"""The tensor contract between the client-facing ``helios`` model and the stage models.

Both flavours of the repository (torch, TensorRT) must provide exactly these names and Triton
dtypes; the tests check every filled config against them.
"""

# Names of the helios model's inputs for each field of a request.
HELIOS_INPUT_NAMES = {"prompt": "PROMPT", "duration": "DURATION_S", "num_frames": "NUM_FRAMES",
                      "fps": "FPS", "seed": "SEED", "temperature": "TEMPERATURE",
                      "top_k": "TOP_K", "top_p": "TOP_P", "image": "IMAGE",
                      "session_id": "SESSION_ID", "video": "VIDEO", "pace": "PACE_S"}
# ... and of the helios_update model's, for the fields of a prompt update (helios.session).
UPDATE_INPUT_NAMES = {"prompt": "PROMPT", "at_frame": "AT_FRAME", "session": "SESSION_ID",
                      "shown_frame": "SHOWN_FRAME"}


# What the helios orchestrator (model_repository/helios/1/model.py) sends to and reads from
# each stage model, by tensor name and Triton dtype. Both flavours of the repository (torch,
# TensorRT) must provide exactly this; the tests check every filled config against it.
# "TABLE" is the prompt-embedding dtype: FP32 in the torch flavour, FP16 in the TensorRT one;
# it passes from prompt_encoder to ar_backbone untouched, so the two must agree.
STAGE_CONTRACT = {
    "prompt_encoder": {
        "inputs": {"PROMPT": "TYPE_STRING"},
        "outputs": {"prompt_embedding_table": "TABLE", "draft_prompt_embedding_table": "TABLE"},
    },
    "image_encoder": {
        "inputs": {"image": "TYPE_UINT8"},
        "outputs": {"latent": "TYPE_FP32", "plan_tokens": "TYPE_INT32"},
    },
    "video_encoder": {
        "inputs": {"frames": "TYPE_UINT8"},
        "outputs": {"latent": "TYPE_FP32", "plan_tokens": "TYPE_INT32"},
    },
    "ar_backbone": {
        "inputs": {"input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32",
                   "request_output_len": "TYPE_INT32", "prompt_embedding_table": "TABLE",
                   "prompt_vocab_size": "TYPE_INT32", "embedding_bias": "TYPE_FP32",
                   "temperature": "TYPE_FP32", "runtime_top_k": "TYPE_INT32",
                   "runtime_top_p": "TYPE_FP32", "random_seed": "TYPE_UINT64",
                   "streaming": "TYPE_BOOL", "stop": "TYPE_BOOL"},
        "outputs": {"output_ids": "TYPE_INT32"},
    },
    "refiner": {
        "inputs": {"plan_tokens": "TYPE_INT32", "seed": "TYPE_INT64", "frame_index": "TYPE_INT32",
                   "anchor": "TYPE_FP32", "history": "TYPE_FP32"},
        "outputs": {"latent": "TYPE_FP32"},
    },
    "vae_decoder": {
        "inputs": {"latent": "TYPE_FP32", "prev_latent": "TYPE_FP32"},
        "outputs": {"frames": "TYPE_UINT8"},
    },
}
