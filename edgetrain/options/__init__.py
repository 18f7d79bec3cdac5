"""RunConfig as the user writes it: the generated command-line options (`command`) and the
grouped TOML file of `--config` / `--print-config` (`file`). torch-free."""
