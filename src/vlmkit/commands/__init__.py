"""The verbs of the `vlmkit` command line, one module per group: each module's add_parsers(sub) registers
its verbs (flags, --help text and set_defaults(run=...)) on the subparsers of vlmkit/cli.py's build_parser.

    talk.py      generate, chat
    plan.py      presets, tokens
    inspect_model.py  inspect
    data.py      data synth
    serve.py     serve
    evaluate.py  eval
    train.py     train
    common.py    the --model, --dtype and --device flags the verbs that load a model share (--device also on
                 train and demo)
"""
