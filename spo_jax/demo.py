"""The main job (placeholder until the demo lands): says what it will do."""


def main() -> None:
    print(
        "spo_jax demo: will train a small decoder with SFT on the synthetic reasoning task, "
        "build correct/incorrect pairs from its samples, and compare DPO, SimPO, DPO+SPO and "
        "SimPO+SPO. Not implemented yet in this revision."
    )


if __name__ == "__main__":
    main()
