"""`python data_tools/encode_latents.py ...`: the command line of bld_t2i/cli/encode_latents.py (see its --help)."""

from bld_t2i.cli.encode_latents import main

if __name__ == "__main__":
    main()
