"""
TensorFlow ops that do something to the machine when a graph runs them: what a SavedModel's graph
or a TFLite model's Flex ops (TensorFlow kernels a TFLite runtime with select ops runs) hold that
counts as code. Its own module: the TFLite reader needs the tables without the SavedModel reader.
"""

# op -> what it does that loading or serving the model would do to the machine
CODE_OPS = {
    "ReadFile": "reads a file", "WriteFile": "writes a file", "MatchingFiles": "lists files",
    "PyFunc": "calls Python code", "PyFuncStateless": "calls Python code", "EagerPyFunc": "calls Python code",
    "WholeFileReader": "reads files", "WholeFileReaderV2": "reads files", "ImmutableConst": "maps a file into memory",
    "CreateSummaryFileWriter": "writes files", "TextLineDataset": "reads files", "TFRecordDataset": "reads files",
    "FixedLengthRecordDataset": "reads files", "LoadAndRemapMatrix": "reads a checkpoint file",
}
# what every SavedModel's saver runs, and code anywhere else (savedmodel's `_checkpoint_ops_outside_the_saver`):
# op -> (the saver's part that may run it, what it does)
CHECKPOINT_OPS = {
    "SaveV2": ("save", "writes checkpoint files where its prefix says"), "Save": ("save", "writes a checkpoint file"),
    "SaveSlices": ("save", "writes a checkpoint file"),
    "MergeV2Checkpoints": ("save", "writes checkpoint files and deletes others"),
    "RestoreV2": ("restore", "reads checkpoint files where its prefix says"),
    "Restore": ("restore", "reads checkpoint files"), "RestoreSlice": ("restore", "reads checkpoint files"),
}
