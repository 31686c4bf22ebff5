"""tinker-cookbook's supervised training loop (`tinker_cookbook.supervised.train.main`, version 0.6.1,
unmodified) against `vllm-train service`, on the toy world. The cookbook's own `FromConversationFileBuilder`
reads the shipped chat JSONL as it is (no data adapter) and its generic "role_colon" renderer formats it;
this script only builds the Config the recipes build in `build_config_blueprint`.

    pip install tinker-cookbook==0.6.1   # its loop needs chz, blobfile (lxml, pycryptodomex), termcolor
    vllm-train service --model vllm_train/assets/tiny-llama --state-dir runs/service &
    TINKER_API_KEY=$VLLM_TRAIN_API_KEY python examples/cookbook_sl.py --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from vllm_train.assets import data_file


def config(base_url: str | None, model: str, log_path: str, steps: int):
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model, renderer_name="role_colon",
                                            max_length=128, batch_size=16,
                                            train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    dataset = FromConversationFileBuilder(common_config=common, file_path=str(data_file("sft_train.jsonl")),
                                          test_size=32)
    return train.Config(log_path=log_path, model_name=model, recipe_name="toy_sl", renderer_name="role_colon",
                        dataset_builder=dataset, learning_rate=1e-3, lr_schedule="constant", num_epochs=1,
                        lora_rank=8, base_url=base_url, save_every=10, eval_every=10, max_steps=steps)


def main(base_url: str | None, model: str, log_path: str, steps: int = 20) -> None:
    from tinker_cookbook.supervised import train

    asyncio.run(train.main(config(base_url, model, log_path, steps)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="the service (default: $TINKER_BASE_URL)")
    parser.add_argument("--model", default=str(Path("vllm_train/assets/tiny-llama").resolve()))
    parser.add_argument("--log-path", default="runs/cookbook_sl")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.base_url, args.model, args.log_path, args.steps)
