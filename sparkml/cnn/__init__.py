"""CNN datasets and fine-tuning: jobs/build_dataset.py, train_cnn.py."""
