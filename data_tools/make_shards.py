"""`python data_tools/make_shards.py ...`: the command line of bld_t2i/cli/make_shards.py (see its --help)."""

from bld_t2i.cli.make_shards import main

if __name__ == "__main__":
    main()
