"""`sft-hf` console script: subcommands are added by the modules that implement them."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {}
    if not argv or argv[0] not in commands:
        print(f"usage: sft-hf {{{','.join(commands) or 'command'}}} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
