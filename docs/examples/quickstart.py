import lightning.pytorch as pl
import gradprune as gp
from gradprune.callbacks import GradualPruningCallback

# a tiny LLaMA trained from scratch on the Python standard library's source: nothing is downloaded
data = gp.TextDataModule(sources="stdlib", tokenizer="bytes", block_size=64, batch_size=8, max_train_tokens=100_000)
llama = dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)
model = gp.PrunableLM(model=llama, vocab_size=data.vocab_size, learning_rate=3e-3)
pruning = GradualPruningCallback(final_sparsity=0.5, schedule="cubic", end_step=0.8, every=5)
pl.Trainer(max_steps=40, callbacks=[pruning], logger=False, enable_checkpointing=False).fit(model, datamodule=data)
print(gp.sparsity_report(model.model, gp.find_targets(model.model))["global"])  # exactly 50% of the targets
